-- GETs spread over keys (and versions): wrk ... -s get.lua <url> -- <prefix> <nkeys> <maxversion> [token]
-- maxversion 0 requests the head (<prefix>/key-NNNNN), otherwise <prefix>/key-NNNNN/<1..maxversion>.
-- With a token, every request carries "Authorization: Bearer <token>".
local next_id = 1

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
end

function init(args)
   prefix = args[1] or "/diary"
   nkeys = tonumber(args[2] or "10000")
   maxversion = tonumber(args[3] or "0")
   if args[4] then
      wrk.headers["Authorization"] = "Bearer " .. args[4]
   end
   math.randomseed(os.time() * 1000 + (id or 0) * 7919)
end

function request()
   local path = string.format("%s/key-%05d", prefix, math.random(0, nkeys - 1))
   if maxversion > 0 then
      path = path .. "/" .. math.random(1, maxversion)
   end
   return wrk.format("GET", path)
end
