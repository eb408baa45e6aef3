using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>
/// The HWPOISON injection site (memory_failure of a present anonymous page) on the model:
/// the PTE becomes a hwpoison entry, the frame is never reused, the next access gets SIGBUS
/// BUS_MCEERR_AR (a kernel access EFAULT), uffd-wp and soft-dirty do not survive, and the
/// entry is copied at fork and dropped by munmap.
/// </summary>
public class HwPoisonTests
{
    private static (Machine M, ulong A) Poisoned(bool memoryFailure = true)
    {
        var m = new Machine(config: new MachineConfig { MemoryFailure = memoryFailure });
        var a = m.Map(2);
        Assert.True(m.Write(a, 0x11, 2).IsCompleted);
        return (m, a);
    }

    private static int Fire(Kernel k, ulong start, ulong end)
    {
        var rule = k.AddInjectRule(new InjectRule { Site = InjectSite.HwPoison, Start = start, End = end }, out var error);
        Assert.Null(error);
        var fired = k.FireNow(rule!.Id, out error);
        k.RemoveInjectRule(rule.Id);
        return error is null ? fired.Count : 0;
    }

    [Fact]
    public void A_poisoned_anon_page_is_a_hwpoison_entry_and_the_next_access_gets_sigbus_mceerr_ar()
    {
        var (m, a) = Poisoned();
        var ctx = m.Uffd(UffdFeatures.PagefaultFlagWp);
        Assert.Equal(Errno.OK, ctx.Register(a, 2 * Machine.Pg, Uapi.RegisterModeWp, out _));
        Assert.Equal(Errno.OK, ctx.Writeprotect(a, 2 * Machine.Pg, Uapi.WriteprotectModeWp));
        var pfn = m.Pagemap(a) & Uapi.PmPfnMask;
        Assert.NotEqual(0UL, m.Pagemap(a) & Uapi.PmUffdWp);

        Assert.Equal(1, Fire(m.K, a, a + Machine.Pg));

        var pte = m.PteAt(a);
        Assert.True(pte.IsHwpoison);
        var pm = m.Pagemap(a);
        // PM_SWAP with the pfn as the offset of type SWP_HWPOISON; uffd-wp is gone (make_hwpoison_entry carries no bit).
        Assert.NotEqual(0UL, pm & Uapi.PmSwap);
        Assert.Equal(0UL, pm & (Uapi.PmPresent | Uapi.PmUffdWp | Uapi.PmMmapExclusive));
        Assert.Equal(PteBits.SwpTypeHwpoison | (pfn << 5), pm & Uapi.PmPfnMask);
        Assert.NotEqual(0UL, m.Mm.KpageFlags(pfn) & (1UL << Uapi.KpfHwpoison));

        // A write to the write-protected page: SIGBUS before any uffd-wp fault (do_swap_page).
        var w = m.Write(a, 0x22);
        Assert.True(w.IsCompleted);
        Assert.Equal(SigCode.BusMceerrAr, w.Signal);
        Assert.Equal(0, ctx.UnreadCount);
        Assert.Equal(SigCode.BusMceerrAr, m.Read(a).Signal);
        var k = m.Access(a, false, origin: AccessOrigin.Kernel);
        Assert.Equal(Errno.EFAULT, k.Result);
        // The neighbour is untouched and still protected.
        Assert.NotEqual(0UL, m.Pagemap(a + Machine.Pg) & Uapi.PmUffdWp);
        Assert.Empty(m.K.CheckInvariants());
    }

    [Fact]
    public void The_frame_is_never_reused_fork_copies_the_entry_and_munmap_drops_it()
    {
        var (m, a) = Poisoned();
        var pfn = m.Pagemap(a) & Uapi.PmPfnMask;
        Assert.Equal(1, Fire(m.K, a, a + Machine.Pg));

        var fork = new ForkOp();
        m.K.Start(m.T, fork);
        Assert.True(fork.IsCompleted);
        Assert.True(m.PteAt(a, fork.Child).IsHwpoison);
        Assert.Equal(SigCode.BusMceerrAr, m.Read(a, t: fork.ChildThread).Signal);

        var unmap = new MunmapOp(a, 2 * Machine.Pg);
        m.K.Start(m.T, unmap);
        Assert.Equal(Errno.OK, unmap.Result);
        Assert.True(m.PteAt(a).IsNone);
        // New pages never get the poisoned frame.
        var b = m.Map(64);
        Assert.True(m.Write(b, 0x33, 64).IsCompleted);
        for (var i = 0UL; i < 64; i++)
            Assert.NotEqual(pfn, m.Pagemap(b + (i * Machine.Pg)) & Uapi.PmPfnMask);
        Assert.True(m.K.PageOf(pfn)!.HwPoison);
        Assert.Empty(m.K.CheckInvariants());
    }

    [Fact]
    public void Without_memory_failure_or_on_a_shared_page_nothing_is_poisoned()
    {
        var (m, a) = Poisoned(memoryFailure: false);
        Assert.Equal(0, Fire(m.K, a, a + (2 * Machine.Pg)));
        Assert.True(m.PteAt(a).Present);

        var (m2, a2) = Poisoned();
        var fork = new ForkOp();
        m2.K.Start(m2.T, fork);
        // Mapped by parent and child: not a page the model's memory_failure takes.
        Assert.Equal(0, Fire(m2.K, a2, a2 + (2 * Machine.Pg)));
        Assert.Equal(0x11, m2.Read(a2).Values[0]);
    }
}
