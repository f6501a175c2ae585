-- Gateways that are behind or silent, worst first: not heard from for more than $1 minutes
-- (e.g. 10; connected gateways report their health every 15 s, so a collector that died
-- without saying goodbye cannot hide one), or holding unacknowledged batches older than that.
-- Needs gateways on protocol version 3 for the backlog columns (NULL before their first
-- health report).
SELECT gateway,
       connected,
       last_seen,
       backlog_batches,
       oldest_backlog_secs,
       software,
       collector
FROM gateways
WHERE last_seen < now() - make_interval(mins => $1)
   OR oldest_backlog_secs > $1 * 60
ORDER BY last_seen, oldest_backlog_secs DESC NULLS LAST;
