<?php
// The PHP daemons' AMQP consumer, as they run it: php-amqp, qos(0, 1), consume with a manual
// ack after processing (here: nothing to process, the job is the message itself).
// With CHANNELS (not how the daemons run), one process opens that many channels on its one
// connection, each with qos(0, 1) and a consumer, served by one consume loop: what the broker
// spends on a connection shared by several consumers.
// usage: php amqp_consumer.php PORT QUEUE [CHANNELS]
$port = (int) $argv[1];
$queue = $argv[2];
$channels = max(1, (int) ($argv[3] ?? 1));
$conn = new AMQPConnection(['host' => '127.0.0.1', 'port' => $port, 'login' => 'guest', 'password' => 'guest']);
$conn->connect();
$queues = [];
for ($i = 0; $i < $channels; $i++) {
    $ch = new AMQPChannel($conn);
    $ch->qos(0, 1);
    $q = new AMQPQueue($ch);
    $q->setName($queue);
    $queues[] = $q;
}
$last = array_pop($queues);
foreach ($queues as $q) {
    $q->consume(null); // the consumer only: the loop below serves every channel
}
$last->consume(function (AMQPEnvelope $msg, AMQPQueue $q) {
    $body = $msg->getBody();
    $q->ack($msg->getDeliveryTag());
    return true;
});
