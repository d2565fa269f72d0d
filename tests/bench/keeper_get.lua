-- bench_keeper.py: GET the head of a random key: wrk ... -s keeper_get.lua <url> -- <prefix> <nkeys>
-- Keys are key-00000 .. key-<nkeys-1> (floors.key_name), as seeded.
local next_id = 1

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
end

function init(args)
   prefix = args[1] or "/diary"
   nkeys = tonumber(args[2] or "10000")
   math.randomseed(os.time() * 1000 + (id or 0) * 7919)
end

function request()
   return wrk.format("GET", string.format("%s/key-%05d", prefix, math.random(0, nkeys - 1)))
end
