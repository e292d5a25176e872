-- Shared by every script. ARGV[1] is the key prefix and ARGV[2] the caller's "now".
local prefix = ARGV[1]
local now = tonumber(ARGV[2])
local rnow = tonumber(redis.call('TIME')[1])
local index = prefix .. 'holds'

-- Lua numbers are doubles and redis.call turns them into strings with 14 digits: write
-- integers through %d so large counters and millisecond timestamps stay exact.
local function int(n) return string.format('%d', n) end

local function get(key)
  local r = redis.call('HMGET', key, 'v', 'e')
  if not r[1] then return 0, nil end
  local e = r[2] and tonumber(r[2]) or nil
  if e and e <= now then return 0, nil end
  return tonumber(r[1]), e
end

local function put(key, v, e)
  if e then
    redis.call('HSET', key, 'v', int(v), 'e', int(e))
    redis.call('PEXPIREAT', key, int((math.max(e, rnow) + $GRACE_SECONDS) * 1000))
  else
    redis.call('HSET', key, 'v', int(v))
    redis.call('HDEL', key, 'e')
    redis.call('PERSIST', key)
  end
end

local function add(key, delta, exp)
  local v, e = get(key)
  v = v + delta
  if v < 0 then v = 0 end
  if v > $MAX_COUNTER then v = $MAX_COUNTER end
  put(key, v, exp or e)
  return v
end

local function release_expired()
  local ids = redis.call('ZRANGEBYSCORE', index, '-inf', now)
  for _, id in ipairs(ids) do
    local hkey = prefix .. 'h:' .. id
    local fields = redis.call('HGETALL', hkey)
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, 1) == '#' then
        add(prefix .. 'c:' .. string.sub(fields[i], 2), -tonumber(fields[i + 1]), nil)
      end
    end
    redis.call('DEL', hkey)
    redis.call('ZREM', index, id)
  end
end
