-- One request, the same every time: wrk ... -s request.lua <url> -- <method> <path> [<body> [<header: value>...]]
-- An empty body ("") sends none. For etcd's JSON gateway (POST /v3/kv/range) and v2 keys API.
function init(args)
   wrk.method = args[1] or "GET"
   wrk.path = args[2] or "/"
   if args[3] and args[3] ~= "" then
      wrk.body = args[3]
   end
   for i = 4, #args do
      local name, value = string.match(args[i], "^([^:]+):%s*(.*)$")
      if name then
         wrk.headers[name] = value
      end
   end
   req = wrk.format()
end

function request()
   return req
end
