-- The latest window of every series for window length $1 (seconds), with its last value:
-- one row per (gateway, series). The primary key's order serves the DISTINCT ON.
SELECT DISTINCT ON (gateway, series)
       gateway, series, metric, tags, window_start, last, count, version
FROM aggregates
WHERE window_secs = $1
ORDER BY gateway, series, window_start DESC;
