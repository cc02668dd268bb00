<?php
// A PHP application's use of php-gearman (libgearman's GearmanClient), as the PHP daemons'
// producers submit their jobs: doNormal/doHigh/doLow, a failing job, a foreground task with
// progress callbacks, doBackground polled with jobStatus, and COUNT concurrent tasks.
// Prints one line per check. usage: php gearman_client.php PORT COUNT
[$self, $port, $count] = $argv;
$c = new GearmanClient();
$c->addServer('127.0.0.1', (int) $port);
$c->setTimeout(60000);
echo 'normal ', $c->doNormal('reverse', 'hello'), "\n";
echo 'binary ', bin2hex($c->doHigh('echo', "a\0b\xff")), "\n";
echo 'low ', $c->doLow('sha256', 'abc'), "\n";
$r = $c->doNormal('fail', 'x');
echo 'fail ', $c->returnCode() === GEARMAN_WORK_FAIL ? 'WORK_FAIL' : $c->returnCode(), " [$r]\n";

// libgearman returns a job's WORK_DATA chunks and its result as one (README, "job.data").
echo 'doNormal ', $c->doNormal('progress', "p0\n"), "\n";

$t = new GearmanClient();
$t->addServer('127.0.0.1', (int) $port);
$t->setStatusCallback(function ($x) { echo 'status ', $x->taskNumerator(), '/', $x->taskDenominator(), "\n"; });
$t->setDataCallback(function ($x) { echo 'data ', $x->data(), "\n"; });
$t->setWarningCallback(function ($x) { echo 'warning ', $x->data(), "\n"; });
$t->setCompleteCallback(function ($x) { echo 'complete ', $x->data(), "\n"; });
$t->addTask('progress', "p1\n");
$t->runTasks();

$h = $c->doBackground('progress', "bg\n");
$seen = [];
for ($i = 0; $i < 100; $i++) {
    $s = $c->jobStatus($h);
    if (!$s[0]) {
        break;
    }
    $seen["$s[2]/$s[3]"] = true;
    usleep(50000);
}
echo 'background ', isset($seen['1/2']) ? 'saw 1/2 ' : '', isset($seen['2/2']) ? 'saw 2/2 ' : '', $i < 100 ? 'ended' : 'never ended', "\n";

$m = new GearmanClient();
$m->addServer('127.0.0.1', (int) $port);
$m->setTimeout(60000);
$got = [];
$m->setCompleteCallback(function ($x) use (&$got) { $got[$x->unique()] = $x->data(); });
for ($i = 0; $i < (int) $count; $i++) {
    $m->addTask('reverse', "x$i", null, "u$i");
}
$m->runTasks();
$wrong = 0;
for ($i = 0; $i < (int) $count; $i++) {
    if (($got["u$i"] ?? null) !== strrev("x$i")) {
        $wrong++;
    }
}
echo 'tasks ', count($got), " done, $wrong wrong\n";
