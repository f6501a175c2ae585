-- Gateways whose newest window ended more than $1 minutes ago (e.g. 10), longest silent
-- first, with when the loader last changed one of their rows. A gateway catching up after
-- an outage is listed until its backlog reaches the present. Reads every gateway's rows
-- (no index leads with the time); for a large table add a time bound on window_start.
SELECT gateway,
       max(window_start + make_interval(secs => window_secs)) AS newest_window_end,
       max(loaded_at) AS last_loaded
FROM aggregates
GROUP BY gateway
HAVING max(window_start + make_interval(secs => window_secs)) < now() - make_interval(mins => $1)
ORDER BY newest_window_end;
