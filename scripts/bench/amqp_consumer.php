<?php
// The PHP daemons' AMQP consumer, as they run it: php-amqp, qos(0, 1), consume with a manual
// ack after processing (here: nothing to process, the job is the message itself).
// usage: php amqp_consumer.php PORT QUEUE
[$self, $port, $queue] = $argv;
$conn = new AMQPConnection(['host' => '127.0.0.1', 'port' => (int) $port, 'login' => 'guest', 'password' => 'guest']);
$conn->connect();
$ch = new AMQPChannel($conn);
$ch->qos(0, 1);
$q = new AMQPQueue($ch);
$q->setName($queue);
$q->consume(function (AMQPEnvelope $msg, AMQPQueue $q) {
    $body = $msg->getBody();
    $q->ack($msg->getDeliveryTag());
    return true;
});
