-- wrk script for tidegate's e2e benchmark: browser-like requests of Seaside sessions.
--
-- Settings come from the environment (run.sh sets them):
--   TG_MODE      where the session id travels: "cookie" (Cookie: _s=ID, the default) or
--                "query" (/app?_s=ID&_k=...)
--   TG_IDS       how many distinct session ids (default 10000); ids are "Kd83" followed by
--                12 digits, 16 characters as Seaside's keys
--   TG_CLOSE=1   ask for a new connection per request (Connection: close)
--   TG_WARM=1    warm-up pass: every id in order, over and over, with "X-Warm: 1" so the
--                backends answer with Set-Cookie: _s=ID. With TG_DONE_FILE set, it writes
--                that file once every id has been answered (plus TG_EXTRA more replies) and
--                stops the thread; without it (faster: no per-reply Lua), the caller stops
--                wrk when the proxy reports the pins
--   TG_PIPELINE  requests per write in the warm-up pass (default 1)
--   TG_FRESH=1   every request a fresh id never sent before ("M", five digits of the start
--                time, a ten-digit counter: 16 characters) with "X-Warm: 1", in the cookie:
--                a local miss whose reply teaches a new pin (the http-miss variant)
--
-- The measured pass picks a random id per request. Up to 200,000 ids the requests are
-- built once in init(); beyond that (the scale curve) each is built on the fly.

local mode = os.getenv("TG_MODE") or "cookie"
local n = tonumber(os.getenv("TG_IDS") or "10000")
local close = os.getenv("TG_CLOSE") == "1"
local warm = os.getenv("TG_WARM") == "1"
local depth = tonumber(os.getenv("TG_PIPELINE") or "1")
local extra = tonumber(os.getenv("TG_EXTRA") or "0")
local done_file = os.getenv("TG_DONE_FILE")
local fresh = os.getenv("TG_FRESH") == "1"

local other_cookies = "_ga=GA1.1.1482931.1716200000; theme=dark; lang=en-GB"
local fixed = "Host: localhost\r\n" ..
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n" ..
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n" ..
    "Accept-Language: en-GB,en;q=0.5\r\n" ..
    "Accept-Encoding: gzip, deflate\r\n"
local tail = ""
if warm or fresh then tail = tail .. "X-Warm: 1\r\n" end
if close then tail = tail .. "Connection: close\r\n" end
tail = tail .. "\r\n"

local run_tag = os.time() % 100000

local function build(i)
  local id = string.format("Kd83%012d", i)
  if fresh then id = string.format("M%05d%010d", run_tag, i) end
  if mode == "query" then
    return "GET /app?_s=" .. id .. "&_k=aB3dE5fG HTTP/1.1\r\n" .. fixed ..
        "Cookie: " .. other_cookies .. "\r\n" .. tail
  end
  return "GET /app?_k=aB3dE5fG HTTP/1.1\r\n" .. fixed ..
      "Cookie: " .. other_cookies .. "; _s=" .. id .. "\r\n" .. tail
end

local reqs = nil
local next_i = 0
local got = 0

function init(args)
  math.randomseed(os.time())
  if not warm and not fresh and n <= 200000 then
    reqs = {}
    for i = 1, n do reqs[i] = build(i - 1) end
  end
end

function request()
  if warm then
    local parts = {}
    for k = 1, depth do
      parts[k] = build(next_i % n)
      next_i = next_i + 1
    end
    return table.concat(parts)
  end
  if fresh then
    next_i = next_i + 1
    return build(next_i)
  end
  if reqs then return reqs[math.random(n)] end
  return build(math.random(0, n - 1))
end

if warm and done_file then
  -- wrk calls request() once before any connection to count the pipeline depth; those ids
  -- are sent again when the sequence wraps, which `extra` (>= depth) covers.
  function response(status, headers, body)
    got = got + 1
    if got == n + extra then
      if done_file then
        local f = io.open(done_file, "w")
        if f then f:write(tostring(got)); f:close() end
      end
      wrk.thread:stop()
    end
  end
end
