-- POST /v1/orders: a unique Idempotency-Key per request, a random customer out of
-- the pre-minted tokens, two lines from two halves of the bench catalog (the same
-- distribution as the pgbench script). Env: BENCH_DIR, BENCH_TOKENS, BENCH_SKU_LO/MID/HI,
-- BENCH_RUN (key prefix), BENCH_PACE_MS (optional: each connection waits an exponentially
-- distributed pause of this mean before each request, so that the offered load is about
-- connections / (pause + latency) per second instead of as fast as the service answers).
dofile(os.getenv("BENCH_DIR") .. "/report.lua")

local tokens = {}
for line in io.lines(os.getenv("BENCH_TOKENS")) do
  tokens[#tokens + 1] = "Bearer " .. line
end
local lo = tonumber(os.getenv("BENCH_SKU_LO"))
local mid = tonumber(os.getenv("BENCH_SKU_MID"))
local hi = tonumber(os.getenv("BENCH_SKU_HI"))
local run = os.getenv("BENCH_RUN")
local pace = tonumber(os.getenv("BENCH_PACE_MS") or "")

local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  threads[#threads + 1] = thread
end

local counter = 0
local prefix
local BODY = '{"email":"buyer@example.com","items":[{"sku":"B%d","quantity":1},{"sku":"B%d","quantity":2}],' ..
  '"shipping_address":{"name":"Ada Lovelace","line1":"1 Main St","line2":null,"city":"London",' ..
  '"postal_code":"N1 9GU","country":"GB"}}'

function init(args)
  math.randomseed(os.time() * 1000 + tid)
  prefix = run .. "-" .. tid .. "-"
end

function request()
  counter = counter + 1
  local body = string.format(BODY, math.random(lo, mid - 1), math.random(mid, hi))
  return wrk.format("POST", "/v1/orders", {
    ["Authorization"] = tokens[math.random(#tokens)],
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter,
  }, body)
end

if pace then
  function delay()
    return math.floor(-math.log(1 - math.random()) * pace)
  end
end
