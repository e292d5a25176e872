-- KEYS[1]: the marker. ARGV[3] expires_at ('' never). 1 for the first claim, else 0.
local seen = redis.call('GET', KEYS[1])
if seen and (seen == 'never' or tonumber(seen) > now) then return 0 end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], 'never')
else
  redis.call('SET', KEYS[1], ARGV[3])
  redis.call('PEXPIREAT', KEYS[1], int((math.max(tonumber(ARGV[3]), rnow) + $GRACE_SECONDS) * 1000))
end
return 1
