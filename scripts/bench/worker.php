<?php
// Anchor for scripts/bench-gearman: a php-gearman worker serving `reverse`.
// Usage: php worker.php HOST PORT
$w = new GearmanWorker();
$w->addServer($argv[1], (int)$argv[2]);
$w->addFunction('reverse', function (GearmanJob $job) { return strrev($job->workload()); });
while ($w->work() || $w->returnCode() == GEARMAN_IO_WAIT || $w->returnCode() == GEARMAN_NO_JOBS) {
}
