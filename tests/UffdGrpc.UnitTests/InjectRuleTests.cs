using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>
/// When a rule fires (fault_attr's interval, probability, times, plus windows of eligible
/// events and of time), and what the log records, on the model directly.
/// </summary>
public class InjectRuleTests
{
    private const ulong A = 0x7e00_0000_0000;
    private const ulong Page = Kernel.PageSize;

    private static (Kernel K, UserfaultfdCtx Ctx) Registered()
    {
        var k = new Kernel();
        var mm = k.CreateMm();
        Assert.Equal(Errno.OK, mm.Mmap(A, 4 * Page, Prot.Read | Prot.Write, shared: false, file: null, offset: 0));
        Assert.Equal(Errno.OK, k.Userfaultfd(mm, Uapi.ONonblock, out var ctx));
        Assert.Equal(Errno.OK, ctx!.Api(Uapi.UffdApi, 0, out _, out _));
        Assert.Equal(Errno.OK, ctx.Register(A, 4 * Page, Uapi.RegisterModeMissing, out _));
        return (k, ctx);
    }

    /// <summary>Which of <paramref name="n"/> ZEROPAGEs of an empty page saw the injected mmap_changing.</summary>
    private static List<int> Busy(UserfaultfdCtx ctx, int n)
    {
        var busy = new List<int>();
        for (var i = 0; i < n; i++)
        {
            var r = ctx.Zeropage(A + ((ulong)(i % 4) * Page), Page, Uapi.ZeropageModeDontwake);
            if (r.Errno == Errno.EAGAIN)
            {
                Assert.Equal(-(long)Errno.EAGAIN, r.Field);
                busy.Add(i);
            }
        }
        return busy;
    }

    [Fact]
    public void Every_after_until_and_times_select_the_eligible_events_that_fire()
    {
        var (k, ctx) = Registered();
        var rule = k.AddInjectRule(new InjectRule { Site = InjectSite.MmapChanging, Every = 3, After = 2, Until = 14, MaxFirings = 3 }, out var error);
        Assert.Null(error);

        // Eligible events 1..20: after 2, every 3rd counted from there (5, 8, 11, 14), at most 3.
        Assert.Equal([4, 7, 10], Busy(ctx, 20));
        Assert.Equal((20L, 3L, true), (rule!.Eligible, rule.Firings, rule.Spent));
        var log = k.InjectionLog();
        Assert.Equal(3, log.Count);
        Assert.All(log, r => Assert.Equal((InjectSite.MmapChanging, rule.Id, ctx.Id, ctx.Mm.Id), (r.Site, r.RuleId, r.UffdId, r.MmId)));
        Assert.Equal([1L, 2, 3], log.Select(r => r.Seq));
    }

    [Fact]
    public void A_probability_with_a_seed_fires_at_the_same_events_every_time_and_another_seed_differs()
    {
        List<int> Run(ulong seed)
        {
            var (k, ctx) = Registered();
            k.AddInjectRule(new InjectRule { Site = InjectSite.MmapChanging, Probability = 0.25, Seed = seed }, out _);
            return Busy(ctx, 200);
        }

        var a = Run(7);
        Assert.Equal(a, Run(7));
        Assert.InRange(a.Count, 25, 75);
        Assert.NotEqual(a, Run(8));
    }

    [Fact]
    public void A_window_in_time_closes_and_a_window_that_outlasts_a_retry_budget_keeps_failing()
    {
        var (k, ctx) = Registered();
        long now = 1000;
        k.InjectClock = () => now;
        k.AddInjectRule(new InjectRule { Site = InjectSite.MmapChanging, DurationMs = 100 }, out _);

        // A handler that retries EAGAIN five times, 10 ms apart, gives up inside the window
        // (firecracker#5056); after the window the same fill succeeds.
        for (var retry = 0; retry < 5; retry++, now += 10)
            Assert.Equal(Errno.EAGAIN, ctx.Zeropage(A, Page, 0).Errno);
        now = 1100;
        Assert.Equal(Errno.OK, ctx.Zeropage(A, Page, 0).Errno);
    }

    [Fact]
    public void Rules_are_validated_scoped_and_bounded()
    {
        var (k, ctx) = Registered();
        Assert.Null(k.AddInjectRule(new InjectRule { Site = InjectSite.FillPartial, Pages = 0 }, out var e1));
        Assert.NotNull(e1);
        Assert.Null(k.AddInjectRule(new InjectRule { Site = (InjectSite)99 }, out _));
        // A rule scoped to another uffd or another range never fires here.
        k.AddInjectRule(new InjectRule { Site = InjectSite.MmapChanging, UffdId = ctx.Id + 1 }, out _);
        k.AddInjectRule(new InjectRule { Site = InjectSite.MmapChanging, Start = A + (8 * Page), End = A + (9 * Page) }, out _);
        Assert.Empty(Busy(ctx, 8));
        for (var i = k.InjectRules.Count; i < Kernel.MaxInjectRules; i++)
            Assert.NotNull(k.AddInjectRule(new InjectRule { Site = InjectSite.Migrate }, out _));
        Assert.Null(k.AddInjectRule(new InjectRule { Site = InjectSite.Migrate }, out var full));
        Assert.Contains("64", full, StringComparison.Ordinal);
        Assert.True(k.RemoveInjectRule(k.InjectRules[0].Id));
        Assert.False(k.RemoveInjectRule(12345));
    }

    [Fact]
    public void A_removed_long_term_pin_is_released_and_the_frame_freed_with_its_mapping()
    {
        var k = new Kernel();
        var mm = k.CreateMm();
        Assert.Equal(Errno.OK, mm.Mmap(A, Page, Prot.Read | Prot.Write, shared: false, file: null, offset: 0, populate: true));
        var pin = k.AddInjectRule(new InjectRule { Site = InjectSite.LongtermPin, Start = A, End = A + Page }, out _);
        Assert.Single(k.FireNow(pin!.Id, out _));
        var frames = k.LiveFrames;
        var zap = k.CreateThread(mm);
        k.Start(zap, new MunmapOp(A, Page));
        Assert.Equal(frames, k.LiveFrames);
        Assert.True(k.RemoveInjectRule(pin.Id));
        Assert.Equal(frames - 1, k.LiveFrames);
        Assert.Empty(k.CheckInvariants());
    }
}
