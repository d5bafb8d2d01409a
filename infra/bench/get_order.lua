-- GET <BENCH_GET_PATH><id> of existing orders, each with its owner's token: the service's
-- cached GET /v1/orders/{id} (the default path), or the one-row asyncpg ceiling of
-- infra/bench/bare_app.py (/bare/orders/, which ignores the token: same requests, same size).
-- Env: BENCH_DIR, BENCH_ORDERS (lines "<order id> <token>"), BENCH_GET_PATH.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")

local path = os.getenv("BENCH_GET_PATH") or "/v1/orders/"
local reqs = {}
for line in io.lines(os.getenv("BENCH_ORDERS")) do
  local id, token = line:match("^(%S+) (%S+)$")
  reqs[#reqs + 1] = wrk.format("GET", path .. id, {["Authorization"] = "Bearer " .. token})
end

function init(args)
  math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1e6))
end

function request()
  return reqs[math.random(#reqs)]
end
