-- Editing or deleting a message finds its pushes not yet sent by the message id in
-- their payload (a notify job's own, a send job's in its notification). Without this
-- index every edit and deletion would scan the whole queue, which is longest exactly
-- when APNs or FCM is down.
CREATE INDEX jobs_push_message_idx ON jobs
    ((coalesce(payload->>'message_id', payload->'notification'->>'message_id')))
    WHERE kind IN ('push.notify', 'push.send');
