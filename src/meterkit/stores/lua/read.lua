-- KEYS: counters. Returns their values (0 when absent or expired), after giving expired holds
-- back, as an apply would: reads agree with decisions.
release_expired()
local out = {}
for i = 1, #KEYS do out[i] = get(KEYS[i]) end
return out
