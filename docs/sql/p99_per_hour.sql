-- p99 of one metric per hour across every gateway, merged from the windows' sketches.
-- $1: the metric; $2: the window length in seconds (choose one: a gateway's 10 s and 1 min
-- windows hold the same readings, so mixing them would count each reading twice).
-- Merging sketches is summing their counts per key; the quantile is the value of the first
-- key whose running count passes rank floor(q * (n - 1)), as edgeferry computes it.
WITH bins AS (
    SELECT date_trunc('hour', a.window_start) AS hour, b.key, sum(b.n) AS n
    FROM aggregates a, unnest(a.sketch_keys, a.sketch_counts) AS b(key, n)
    WHERE a.metric = $1 AND a.window_secs = $2
    GROUP BY 1, 2
), ranked AS (
    SELECT hour, key,
           sum(n) OVER (PARTITION BY hour ORDER BY key) AS upto,
           sum(n) OVER (PARTITION BY hour) AS total
    FROM bins
)
SELECT DISTINCT ON (hour) hour, edgeferry_bin_value(key) AS p99, total::bigint AS readings
FROM ranked
WHERE upto > floor(0.99 * (total - 1))
ORDER BY hour, key;
