using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>The model's observation events: every userfault sleep is reported once, with its class and what ended it.</summary>
public sealed class ObservationTests
{
    private const ulong Pg = Machine.Pg;

    private static (Machine M, UserfaultfdCtx U, ulong A, List<UserfaultClass> Raised, List<UserfaultEnd> Ended) Setup(ulong mode)
    {
        var m = new Machine();
        var a = m.Map(4);
        var u = m.Uffd();
        Assert.Equal(Errno.OK, u.Register(a, 4 * Pg, mode, out _));
        var raised = new List<UserfaultClass>();
        var ended = new List<UserfaultEnd>();
        m.K.UserfaultRaised += raised.Add;
        m.K.UserfaultEnded += ended.Add;
        return (m, u, a, raised, ended);
    }

    [Fact]
    public void A_missing_fault_woken_by_UFFDIO_WAKE_after_being_read_reports_both_phases()
    {
        var (m, u, a, raised, ended) = Setup(Uapi.RegisterModeMissing);
        var read = m.Read(a);
        Assert.Equal(Errno.OK, u.Read(out _));
        Assert.Equal(Errno.OK, u.Zeropage(a, Pg, Uapi.ZeropageModeDontwake).Errno);
        Assert.Empty(ended);
        Assert.Equal(Errno.OK, u.Wake(a, Pg));

        Assert.True(read.IsCompleted);
        Assert.Equal([UserfaultClass.Missing], raised);
        var e = Assert.Single(ended);
        Assert.Equal((UserfaultClass.Missing, UserfaultOutcome.Wake), (e.Class, e.Outcome));
        Assert.NotNull(e.Queued);
        Assert.NotNull(e.Handled);
        Assert.True(e.RaisedAt <= e.ReadAt && e.ReadAt <= e.EndedAt);
    }

    [Fact]
    public void A_wp_fault_never_read_and_resolved_by_unprotecting_has_no_phases()
    {
        var (m, u, a, raised, ended) = Setup(Uapi.RegisterModeWp);
        m.Write(a, 1);
        Assert.Equal(Errno.OK, u.Writeprotect(a, Pg, Uapi.WriteprotectModeWp));
        var write = m.Write(a, 2);
        Assert.Equal(Errno.OK, u.Writeprotect(a, Pg, 0));

        Assert.True(write.IsCompleted);
        Assert.Equal([UserfaultClass.Wp], raised);
        var e = Assert.Single(ended);
        Assert.Equal((UserfaultClass.Wp, UserfaultOutcome.Writeprotect), (e.Class, e.Outcome));
        Assert.Null(e.Queued);
    }

    [Fact]
    public void Closing_the_uffd_and_exiting_the_process_end_the_sleeps_they_end()
    {
        var (m, u, a, _, ended) = Setup(Uapi.RegisterModeMissing);
        m.Read(a);
        u.Release();
        var t2 = m.K.CreateThread(m.Mm);
        var u2 = m.Uffd();
        var b = m.Map(1);
        Assert.Equal(Errno.OK, u2.Register(b, Pg, Uapi.RegisterModeMissing, out _));
        m.Read(b, t: t2);
        m.K.Locked(m.Mm.Exit);

        Assert.Equal([UserfaultOutcome.Close, UserfaultOutcome.Exit], ended.Select(e => e.Outcome));
    }
}
