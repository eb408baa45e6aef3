using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>Long operations yield the machine lock every Kernel.ReschedPages pages when a host schedules the rest (cond_resched).</summary>
public sealed class YieldTests
{
    [Fact]
    public void A_long_populate_runs_in_chunks_when_a_host_schedules_them_and_to_the_end_otherwise()
    {
        var pages = (Kernel.ReschedPages * 2) + 10;
        var scheduled = 0;
        var m = new Machine();
        m.K.ScheduleYielded = () => scheduled++;
        var a = m.Map((ulong)pages);
        var op = new PopulateOp(a, (ulong)pages * Machine.Pg, write: true);
        m.K.Start(m.T, op);
        Assert.False(op.IsCompleted);
        Assert.Equal(1, scheduled);
        Assert.Equal(UffdGrpc.Mm.ThreadState.Running, m.T.State);
        m.K.RunYielded();
        Assert.False(op.IsCompleted);
        m.K.RunYielded();
        Assert.True(op.IsCompleted);
        Assert.Equal(2, scheduled);
        Assert.Equal(Errno.OK, op.Result);
        Assert.True((m.Pagemap(a + ((ulong)(pages - 1) * Machine.Pg)) & Uapi.PmPresent) != 0);

        var plain = new Machine();
        var b = plain.Map((ulong)pages);
        var whole = new PopulateOp(b, (ulong)pages * Machine.Pg, write: true);
        plain.K.Start(plain.T, whole);
        Assert.True(whole.IsCompleted);
    }

    [Fact]
    public void A_thread_killed_while_yielded_is_not_run_again()
    {
        var m = new Machine();
        m.K.ScheduleYielded = () => { };
        var pages = Kernel.ReschedPages + 1;
        var a = m.Map((ulong)pages);
        var op = m.Access(a, write: true, value: 1, count: pages);
        Assert.False(op.IsCompleted);
        m.K.Locked(m.Mm.Exit);
        m.K.RunYielded();
        Assert.True(op.Aborted);
    }
}
