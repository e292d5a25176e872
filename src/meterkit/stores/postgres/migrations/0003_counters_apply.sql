-- counters_apply in one round trip: the decision as a server-side function
-- The rule of meterkit.counters.apply, line for line, as the Lua script of the Redis store
-- mirrors it: expired holds given back first (SKIP LOCKED), every row it touches locked in key
-- order (placeholders made for absent ones, read as 0), all lines admitted or none, the hold
-- written (or replaced) with them. Returns {admitted, used..., previous...}.
CREATE OR REPLACE FUNCTION mk_counters_apply(
  k text[], amt bigint[], lim bigint[], exp bigint[], pk text[], w float8[], now_ bigint,
  hid text, horg text, hamounts jsonb, hexp bigint
) RETURNS bigint[] LANGUAGE plpgsql AS $fn$
DECLARE
  n int := coalesce(array_length(k, 1), 0);
  maxc constant bigint := 9007199254740991;
  rel_k text[] := '{}';
  rel_a bigint[] := '{}';
  want text[];
  rk text[];
  rv bigint[];
  re bigint[];
  dirty boolean[];
  cur bigint[] := '{}';
  prev bigint[] := '{}';
  used bigint[] := '{}';
  ok boolean := true;
  h record;
  item jsonb;
  i int;
  j int;
  tries int := 0;
BEGIN
  FOR h IN
    WITH gone AS (
      DELETE FROM mk_holds WHERE id IN (
        SELECT id FROM mk_holds WHERE expires_at <= now_ ORDER BY id FOR UPDATE SKIP LOCKED
      ) RETURNING id, amounts
    ) SELECT id, amounts FROM gone ORDER BY id
  LOOP
    FOR item IN SELECT value FROM jsonb_array_elements(h.amounts) LOOP
      rel_k := rel_k || (item->>0);
      rel_a := rel_a || (item->>1)::bigint;
    END LOOP;
  END LOOP;
  want := ARRAY(
    SELECT DISTINCT (x COLLATE "C") AS y FROM unnest(k || pk || rel_k) AS x
    WHERE x IS NOT NULL ORDER BY y
  );
  LOOP
    INSERT INTO mk_counters (key, value, expires_at)
      SELECT x, 0, 0 FROM unnest(want) AS x ORDER BY x COLLATE "C"
      ON CONFLICT (key) DO NOTHING;
    SELECT array_agg(s.key ORDER BY s.key), array_agg(s.value ORDER BY s.key),
           array_agg(s.expires_at ORDER BY s.key)
      INTO rk, rv, re
      FROM (SELECT key, value, expires_at FROM mk_counters WHERE key = ANY(want)
            ORDER BY key FOR UPDATE) AS s;
    -- A placeholder the sweep deleted between the two statements is simply made again.
    EXIT WHEN coalesce(array_length(rk, 1), 0) = coalesce(array_length(want, 1), 0);
    tries := tries + 1;
    IF tries >= 10 THEN
      RAISE EXCEPTION 'meterkit: could not lock its counter rows';
    END IF;
  END LOOP;
  dirty := array_fill(false, ARRAY[coalesce(array_length(rk, 1), 0)]);
  FOR i IN 1 .. coalesce(array_length(rk, 1), 0) LOOP
    IF re[i] IS NOT NULL AND re[i] <= now_ THEN  -- expired (or a placeholder): absent
      rv[i] := 0;
      re[i] := NULL;
    END IF;
  END LOOP;
  FOR j IN 1 .. coalesce(array_length(rel_k, 1), 0) LOOP
    i := array_position(rk, rel_k[j]);
    rv[i] := greatest(0, least(maxc, rv[i] - rel_a[j]));
    dirty[i] := true;
  END LOOP;
  FOR j IN 1 .. n LOOP
    cur := cur || rv[array_position(rk, k[j])];
    prev := prev || CASE WHEN pk[j] IS NULL THEN 0 ELSE rv[array_position(rk, pk[j])] END;
    IF cur[j] + amt[j] > maxc THEN
      ok := false;
    ELSIF lim[j] IS NOT NULL
          AND floor(prev[j]::float8 * w[j])::bigint + cur[j] + amt[j] > lim[j] THEN
      ok := false;
    END IF;
  END LOOP;
  IF ok THEN
    FOR j IN 1 .. n LOOP
      i := array_position(rk, k[j]);
      rv[i] := greatest(0, least(maxc, rv[i] + amt[j]));
      IF exp[j] IS NOT NULL THEN
        re[i] := exp[j];
      END IF;
      dirty[i] := true;
      used := used || rv[i];
    END LOOP;
    IF hid IS NOT NULL THEN
      INSERT INTO mk_holds (id, organization_id, amounts, expires_at)
        VALUES (hid, horg, hamounts, hexp)
        ON CONFLICT (id) DO UPDATE SET organization_id = excluded.organization_id,
          amounts = excluded.amounts, expires_at = excluded.expires_at;
    END IF;
  ELSE
    used := cur;
  END IF;
  UPDATE mk_counters AS c SET value = u.v, expires_at = u.e
    FROM unnest(rk, rv, re, dirty) AS u(key, v, e, d)
    WHERE u.d AND c.key = u.key;
  RETURN ARRAY[CASE WHEN ok THEN 1 ELSE 0 END]::bigint[] || used || prev;
END
$fn$
