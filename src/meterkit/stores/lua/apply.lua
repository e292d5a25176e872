-- KEYS: index, hold key, the n line keys, the n previous-window keys (the line key again for
-- a line without one). ARGV[3] n, [4] hold id ('' for none), [5] its expires_at, [6] its
-- organization; then per line: amount, limit ('' none), expires_at ('' none), has previous
-- ('1'/'0'), previous weight; then the hold's (counter key, amount) pairs.
-- Returns {admitted, used..., previous...}: the state of meterkit.models.CounterResult.
local n = tonumber(ARGV[3])
release_expired()
local cur, prev = {}, {}
for i = 1, n do
  local a = 7 + (i - 1) * 5
  cur[i] = get(KEYS[2 + i])
  if ARGV[a + 3] == '1' then prev[i] = get(KEYS[2 + n + i]) else prev[i] = 0 end
end
local admitted = 1
for i = 1, n do
  local a = 7 + (i - 1) * 5
  if ARGV[a + 1] ~= '' then
    -- meterkit.counters.fits, line for line
    local estimate = math.floor(prev[i] * tonumber(ARGV[a + 4])) + cur[i]
    if estimate + tonumber(ARGV[a]) > tonumber(ARGV[a + 1]) then admitted = 0 end
  end
  if cur[i] + tonumber(ARGV[a]) > $MAX_COUNTER then admitted = 0 end
end
local out = {admitted}
for i = 1, n do
  if admitted == 1 then
    local a = 7 + (i - 1) * 5
    local exp = nil
    if ARGV[a + 2] ~= '' then exp = tonumber(ARGV[a + 2]) end
    out[#out + 1] = add(KEYS[2 + i], tonumber(ARGV[a]), exp)
  else
    out[#out + 1] = cur[i]
  end
end
for i = 1, n do out[#out + 1] = prev[i] end
if admitted == 1 and ARGV[4] ~= '' then
  local fields = {'org', ARGV[6], 'exp', ARGV[5]}
  for j = 7 + 5 * n, #ARGV, 2 do
    fields[#fields + 1] = '#' .. ARGV[j]
    fields[#fields + 1] = ARGV[j + 1]
  end
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], unpack(fields))
  redis.call('ZADD', KEYS[1], ARGV[5], ARGV[4])
end
return out
