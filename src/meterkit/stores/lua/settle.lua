-- KEYS: index, hold key, the delta keys. ARGV[3] hold id, then one delta per delta key.
release_expired()
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[3])
for i = 3, #KEYS do add(KEYS[i], tonumber(ARGV[i + 1]), nil) end
return 1
