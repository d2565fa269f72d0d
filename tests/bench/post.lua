-- POSTs of new versions on distinct keys: wrk ... -s post.lua <url> -- <tag> <mode> <pool> <prefix>
-- mode "next": each thread cycles over <pool> keys of its own, posting version 1, 2, 3, ... to
--   each in turn; version v of a key is only sent <pool> requests after version v-1 was, so with
--   pool >> connections per thread it has long been answered (a 409 would show as non-2xx).
-- mode "new": every request is version 1 of a new key.
-- <tag> must be unique per wrk run (the Lua state, and so the counters, restart with each run).
-- wrk calls request() once on thread 1 to check the script and throws that request away, so
-- each thread's first request goes to a throwaway key nothing else depends on.
local next_id = 1

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
end

function init(args)
   tag = args[1]
   mode = args[2] or "next"
   pool = tonumber(args[3] or "200")
   prefix = args[4] or "/diary"
   counter = 0
   headers = {
      ["X-Rainer-Author"] = "bench",
      ["X-Rainer-Comment"] = "wrk",
      ["Content-Type"] = "application/json",
   }
   pad = string.rep("x", 150)
end

function request()
   local key, version
   if counter == 0 then
      key = string.format("%s-t%d-first", tag, id)
      version = 1
   elseif mode == "new" then
      key = string.format("%s-t%d-%d", tag, id, counter)
      version = 1
   else
      key = string.format("%s-t%d-%d", tag, id, (counter - 1) % pool)
      version = math.floor((counter - 1) / pool) + 1
   end
   counter = counter + 1
   local body = string.format('{"key": "%s", "version": %d, "settings": {"pad": "%s"}}', key, version, pad)
   return wrk.format("POST", string.format("%s/%s/%d", prefix, key, version), headers, body)
end
