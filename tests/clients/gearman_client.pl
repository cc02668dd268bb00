# A Perl application's use of Gearman::Client (the pure-Perl CPAN client, not libgearman):
# do_task, a failing job, progress callbacks, dispatch_background polled with get_status, and
# COUNT tasks in one task set. Prints one line per check. usage: perl gearman_client.pl PORT COUNT
use strict;
use warnings;
use Gearman::Client;

my ($port, $count) = @ARGV;
my $c = Gearman::Client->new(job_servers => ["127.0.0.1:$port"]);
my $r = $c->do_task('reverse', 'hello');
print "normal ", ($r ? $$r : 'undef'), "\n";
$r = $c->do_task('echo', "a\0b\xff");
print "binary ", unpack("H*", $$r), "\n";
my $failed = 0;
$r = $c->do_task('fail', 'x', { on_fail => sub { $failed++ } });
print "fail ", (defined $r ? "result $$r" : 'undef'), " on_fail $failed\n";
$r = $c->do_task('progress', "pl\n", {
    on_status  => sub { print "status $_[0]/$_[1]\n" },
    on_data    => sub { print "data ${$_[0]}\n" },
    on_warning => sub { print "warning ${$_[0]}\n" },
});
print "complete $$r\n";  # without the WORK_DATA: on_data had it (libgearman appends it)
my $h = $c->dispatch_background('progress', "bg\n");
my (%seen, $ended);
for (1 .. 100) {
    my $s = $c->get_status($h);
    if (!$s || !$s->known) { $ended = 1; last }
    $seen{ $s->percent } = 1 if defined $s->percent;
    select(undef, undef, undef, 0.05);
}
print "background ", ($seen{0.5} ? 'saw 1/2 ' : ''), ($seen{1} ? 'saw 2/2 ' : ''), ($ended ? 'ended' : 'never ended'), "\n";
my $ts = $c->new_task_set;
my %got;
for my $i (0 .. $count - 1) {
    $ts->add_task('reverse', "y$i", { uniq => "v$i", on_complete => sub { $got{$i} = ${ $_[0] } } });
}
$ts->wait(timeout => 60);
my $wrong = grep { ($got{$_} // '') ne reverse("y$_") } 0 .. $count - 1;
print "tasks ", scalar(keys %got), " done, $wrong wrong\n";
