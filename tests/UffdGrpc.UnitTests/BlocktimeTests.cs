using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>
/// Blocktime with QEMU's postcopy-blocktime rule: a thread's time asleep in userfaults, and a
/// process's time during which all its live threads slept at once (counted once).
/// </summary>
public class BlocktimeTests
{
    private static readonly TimeSpan s_nap = TimeSpan.FromMilliseconds(30);

    private static (Machine M, ulong A, UserfaultfdCtx Ctx, SimThread Other) Registered()
    {
        var m = new Machine();
        var a = m.Map(4);
        var ctx = m.Uffd();
        Assert.Equal(Errno.OK, ctx.Register(a, 4 * Machine.Pg, Uapi.RegisterModeMissing, out _));
        return (m, a, ctx, m.K.CreateThread(m.Mm));
    }

    [Fact]
    public void One_thread_asleep_while_another_runs_has_blocktime_but_the_process_has_none()
    {
        var (m, a, ctx, _) = Registered();
        var read = m.Read(a);
        Assert.Equal(UffdGrpc.Mm.ThreadState.BlockedInUserfault, m.T.State);
        Thread.Sleep(s_nap);
        Assert.True(ctx.Zeropage(a, Machine.Pg, 0).Errno == Errno.OK);
        Assert.True(read.IsCompleted);

        Assert.True(m.T.Blocktime >= s_nap, $"{m.T.Blocktime}");
        Assert.Equal(TimeSpan.Zero, m.Mm.Blocktime);
    }

    [Fact]
    public void Time_with_every_thread_asleep_counts_once_for_the_process()
    {
        var (m, a, ctx, other) = Registered();
        var r1 = m.Read(a);
        var r2 = m.Read(a + Machine.Pg, t: other);
        Thread.Sleep(s_nap);
        ctx.Zeropage(a, 2 * Machine.Pg, 0);
        Assert.True(r1.IsCompleted && r2.IsCompleted);

        Assert.True(m.Mm.Blocktime >= s_nap, $"{m.Mm.Blocktime}");
        // Counted once: the process's blocktime is at most either thread's.
        Assert.True(m.Mm.Blocktime <= m.T.Blocktime && m.Mm.Blocktime <= other.Blocktime);
        var frozen = m.Mm.Blocktime;
        Thread.Sleep(5);
        Assert.Equal(frozen, m.Mm.Blocktime);
    }

    [Fact]
    public void A_new_thread_ends_the_interval_in_which_every_thread_was_asleep()
    {
        var m = new Machine();
        var a = m.Map(1);
        var ctx = m.Uffd();
        Assert.Equal(Errno.OK, ctx.Register(a, Machine.Pg, Uapi.RegisterModeMissing, out _));
        var read = m.Read(a);
        // The only thread sleeps: the process is blocked.
        Thread.Sleep(s_nap);
        Assert.True(m.Mm.Blocktime >= s_nap, $"{m.Mm.Blocktime}");
        // A new thread runs: the process is no longer wholly blocked, while the sleeper still is.
        m.K.CreateThread(m.Mm);
        var frozen = m.Mm.Blocktime;
        Thread.Sleep(5);
        Assert.Equal(frozen, m.Mm.Blocktime);
        Assert.True(m.T.Blocktime > frozen);
        ctx.Zeropage(a, Machine.Pg, 0);
        Assert.True(read.IsCompleted);
    }
}
