<?php
// The PHP daemons' ZeroMQ loop: recv, (hand to a pool: here nothing), send 'TRUE'.
// php rep_loop.php ENDPOINT [FILE]: with FILE, each message is appended and fsynced first.
$ctx = new ZMQContext();
$rep = $ctx->getSocket(ZMQ::SOCKET_REP);
$rep->bind($argv[1]);
$file = isset($argv[2]) ? fopen($argv[2], 'a') : null;
while (true) {
    $msg = $rep->recvMulti();
    if ($file) {
        fwrite($file, implode("\0", $msg) . "\n");
        fflush($file);
        fsync($file);
    }
    $rep->send('TRUE');
}
