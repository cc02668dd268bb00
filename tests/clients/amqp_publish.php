<?php
// Publishes as the PHP daemons' producers do, with php-amqp (the PECL AMQPConnection API):
// declares the durable direct exchange and durable queue, binds them by the routing key, and
// publishes COUNT persistent messages "PREFIX-<i>" (message_id "PREFIX-<i>", or ID for all).
// usage: php amqp_publish.php PORT EXCHANGE QUEUE ROUTING_KEY COUNT PREFIX [TYPE] [ID] [VHOST]
[$self, $port, $exchange, $queue, $key, $count, $prefix] = array_slice($argv, 0, 7);
$type = $argv[7] ?? '';
$id = $argv[8] ?? '';
$vhost = $argv[9] ?? '/';
$conn = new AMQPConnection(['host' => '127.0.0.1', 'port' => (int) $port, 'vhost' => $vhost, 'login' => 'guest', 'password' => 'guest']);
$conn->connect();
$ch = new AMQPChannel($conn);
$ex = new AMQPExchange($ch);
$ex->setName($exchange);
$ex->setType(AMQP_EX_TYPE_DIRECT);
$ex->setFlags(AMQP_DURABLE);
$ex->declareExchange();
if ($queue !== '-') { // '-': the queue is declared elsewhere (with arguments of its own)
    $q = new AMQPQueue($ch);
    $q->setName($queue);
    $q->setFlags(AMQP_DURABLE);
    $q->declareQueue();
    $q->bind($exchange, $key);
}
for ($i = 0; $i < (int) $count; $i++) {
    $attrs = ['delivery_mode' => 2, 'message_id' => $id !== '' ? $id : "$prefix-$i"];
    if ($type !== '') {
        $attrs['type'] = $type;
    }
    $ex->publish("$prefix-$i", $key, AMQP_NOPARAM, $attrs);
}
$conn->disconnect();
echo "published $count\n";
