-- GET /v1/orders/{id} of existing (cached) orders, each with its owner's token.
-- Env: BENCH_DIR, BENCH_ORDERS (lines "<order id> <token>").
dofile(os.getenv("BENCH_DIR") .. "/report.lua")

local reqs = {}
for line in io.lines(os.getenv("BENCH_ORDERS")) do
  local id, token = line:match("^(%S+) (%S+)$")
  reqs[#reqs + 1] = wrk.format("GET", "/v1/orders/" .. id, {["Authorization"] = "Bearer " .. token})
end

function init(args)
  math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1e6))
end

function request()
  return reqs[math.random(#reqs)]
end
