using UffdGrpc.Mm;
using ThreadState = UffdGrpc.Mm.ThreadState;

namespace UffdGrpc.UnitTests;

public class UserfaultfdTests
{
    private const ulong Pg = Machine.Pg;

    [Fact]
    public void Api_handshake_rules()
    {
        var m = new Machine();
        Assert.Equal(Errno.OK, m.K.Userfaultfd(m.Mm, Uapi.ONonblock, out var u));
        Assert.Equal((false, true), u!.Poll());
        Assert.Equal(Errno.EINVAL, u.Register(m.Map(1), Pg, Uapi.RegisterModeWp, out _));
        Assert.Equal(Errno.EINVAL, u.Api(0xab, 0, out var f, out var io));
        Assert.Equal((0UL, 0UL), (f, io));
        Assert.Equal(Errno.EINVAL, u.Api(Uapi.UffdApi, 1UL << 63, out f, out _));
        Assert.Equal(0UL, f);
        Assert.Equal(Errno.EINVAL, u.Api(Uapi.UffdApi, 1UL << 17, out _, out _));
        Assert.Equal(Errno.OK, u.Api(Uapi.UffdApi, (ulong)UffdFeatures.WpAsync, out f, out io));
        Assert.Equal(0x1ffffUL, f);
        Assert.Equal(Uapi.ApiIoctls, io);
        Assert.True(u.WpUnpopulated);
        Assert.Equal(Errno.EINVAL, u.Api(Uapi.UffdApi, 0, out f, out _));
        Assert.Equal(0UL, f);
        Assert.Equal(Errno.EINVAL, m.K.Userfaultfd(m.Mm, 0x4, out _));
        Assert.Equal(Errno.OK, m.K.Userfaultfd(m.Mm, 0, out var blocking));
        blocking!.Api(Uapi.UffdApi, 0, out _, out _);
        Assert.Equal((false, true), blocking.Poll());
    }

    [Fact]
    public void Register_validation_and_returned_ioctls()
    {
        var m = new Machine();
        var a = m.Map(4);
        var u = m.Uffd();
        Assert.Equal(Errno.EINVAL, u.Register(a, 4 * Pg, 0, out _));
        Assert.Equal(Errno.EINVAL, u.Register(a, 4 * Pg, Uapi.RegisterModeMinor, out _));
        Assert.Equal(Errno.EINVAL, u.Register(a, 4 * Pg, 8, out _));
        Assert.Equal(Errno.EINVAL, u.Register(a + 1, Pg, Uapi.RegisterModeWp, out _));
        Assert.Equal(Errno.EINVAL, u.Register(a, 0, Uapi.RegisterModeWp, out _));
        Assert.Equal(Errno.OK, u.Register(a, 4 * Pg, Uapi.RegisterModeMissing, out var io));
        Assert.Equal(0x13cUL, io); // WAKE|COPY|ZEROPAGE|MOVE|POISON
        Assert.Equal(Errno.OK, u.Register(a, 4 * Pg, Uapi.RegisterModeWp, out io));
        Assert.Equal(0x17cUL, io); // + WRITEPROTECT
        var other = m.Uffd();
        Assert.Equal(Errno.EBUSY, other.Register(a, Pg, Uapi.RegisterModeWp, out _));
        Assert.Equal(Errno.EINVAL, other.Unregister(a, Pg));
        var ro = m.K.CreateFile("ro", true, Pg);
        var r = 0x7e10_0000_0000UL;
        m.Mm.Mmap(r, Pg, Prot.Read, true, ro, 0, readOnlyFd: true);
        Assert.Equal(Errno.EPERM, u.Register(r, Pg, Uapi.RegisterModeMissing, out _));
        var file = m.K.CreateFile("f", shmem: false, Pg);
        var fa = m.Map(1, shared: true, file: file);
        Assert.Equal(Errno.EINVAL, u.Register(fa, Pg, Uapi.RegisterModeWp, out _));
        var async = m.Uffd(UffdFeatures.WpAsync);
        Assert.Equal(Errno.OK, async.Register(fa, Pg, Uapi.RegisterModeWp, out _));
    }

    [Fact]
    public void Copy_result_field_convention()
    {
        var m = new Machine();
        var a = m.Map(4);
        var u = m.Uffd();
        u.Register(a, 4 * Pg, Uapi.RegisterModeMissing, out _);
        var src = new byte[4 * Pg];
        Array.Fill(src, (byte)0x11);
        Assert.Equal(new FillResult(Errno.EINVAL, null), u.Copy(a + 1, src, 0x1000, Pg, 0));
        Assert.Equal(new FillResult(Errno.EINVAL, null), u.Copy(a, src, 0x1000, Pg, 4));
        Assert.Equal(new FillResult(Errno.OK, 4096), u.Copy(a, src, 0x1001, Pg, 0));
        Assert.Equal(new FillResult(Errno.EEXIST, -17), u.Copy(a, src, 0x1000, Pg, 0));
        // A partial copy stops at the first occupied page: EAGAIN with the bytes done.
        Assert.Equal(Errno.OK, u.Zeropage(a + (3 * Pg), Pg, 0).Errno);
        Assert.Equal(new FillResult(Errno.EAGAIN, 8192), u.Copy(a + Pg, src, 0x1000, 3 * Pg, 0));
        Assert.Equal(new FillResult(Errno.EINVAL, -22), u.Copy(a + Pg, src, 0x1000, Pg, Uapi.CopyModeWp));
        var b = m.Map(1);
        Assert.Equal(new FillResult(Errno.ENOENT, -2), u.Copy(b, src, 0x1000, Pg, 0));
    }

    [Fact]
    public void Zeropage_refuses_markers_but_copy_overwrites_them()
    {
        var m = new Machine();
        var a = m.Map(2);
        var u = m.Uffd(UffdFeatures.WpUnpopulated);
        u.Register(a, 2 * Pg, Uapi.RegisterModeMissing | Uapi.RegisterModeWp, out _);
        u.Writeprotect(a, 2 * Pg, Uapi.WriteprotectModeWp);
        Assert.True(m.PteAt(a).IsUffdWpMarker);
        Assert.Equal(new FillResult(Errno.EEXIST, -17), u.Zeropage(a, Pg, 0));
        Assert.Equal(Errno.EEXIST, u.Poison(a, Pg, 0).Errno);
        var src = new byte[Pg];
        Assert.Equal(new FillResult(Errno.OK, 4096), u.Copy(a, src, 0x1000, Pg, 0));
        Assert.False(m.PteAt(a).UffdWp);
        Assert.Equal(Errno.OK, u.Writeprotect(a + Pg, Pg, 0));
        Assert.Equal(new FillResult(Errno.OK, 4096), u.Poison(a + Pg, Pg, 0));
        Assert.Equal(SigCode.BusAdrerr, m.Read(a + Pg).Signal);
        Assert.Equal(new FillResult(Errno.OK, 4096), u.Copy(a + Pg, src, 0x1000, Pg, 0));
    }

    [Fact]
    public void Writeprotect_mode_rules_and_partial_enoent_is_not_rolled_back()
    {
        var m = new Machine();
        var a = m.Map(2);
        var b = m.Map(1);
        m.Write(a, 1, 2);
        var u = m.Uffd();
        u.Register(a, Pg, Uapi.RegisterModeWp, out _);
        Assert.Equal(Errno.EINVAL, u.Writeprotect(a, Pg, Uapi.WriteprotectModeWp | Uapi.WriteprotectModeDontwake));
        Assert.Equal(Errno.EINVAL, u.Writeprotect(a, Pg, 4));
        Assert.Equal(Errno.ENOENT, u.Writeprotect(b, Pg, Uapi.WriteprotectModeWp));
        // The first page's VMA is WP-registered, the second is not: ENOENT, and the first stays protected.
        Assert.Equal(Errno.ENOENT, u.Writeprotect(a, 2 * Pg, Uapi.WriteprotectModeWp));
        Assert.True(m.PteAt(a).UffdWp);
        Assert.False(m.PteAt(a + Pg).UffdWp);
    }

    [Fact]
    public void Continue_needs_a_page_cache_page_and_poison_needs_an_empty_slot()
    {
        var m = new Machine();
        var f = m.K.CreateFile("s", true, 2 * Pg);
        var s = m.Map(2, shared: true, file: f);
        var alias = m.Map(2, shared: true, file: f);
        m.Write(alias, 0x11);
        var u = m.Uffd();
        Assert.Equal(Errno.OK, u.Register(s, 2 * Pg, Uapi.RegisterModeMinor, out var io));
        Assert.NotEqual(0UL, io & (1UL << Uapi.UffdioContinue));
        Assert.Equal(new FillResult(Errno.OK, 4096), u.Continue(s, Pg, 0));
        Assert.Equal(new FillResult(Errno.EEXIST, -17), u.Continue(s, Pg, 0));
        Assert.Equal(new FillResult(Errno.EFAULT, -14), u.Continue(s + Pg, Pg, 0));
        Assert.Equal(0x11, m.Read(s).Values[0]);
        var anon = m.Map(1);
        u.Register(anon, Pg, Uapi.RegisterModeMissing, out _);
        Assert.Equal(new FillResult(Errno.EINVAL, -22), u.Continue(anon, Pg, 0));
    }

    [Fact]
    public void Move_keeps_the_page_and_a_page_shared_since_fork_is_ebusy()
    {
        var m = new Machine();
        var d = m.Map(2);
        var s = m.Map(2);
        m.Write(s, 0x11, 2);
        var pfn = m.Pagemap(s) & Uapi.PmPfnMask;
        var u = m.Uffd();
        u.Register(d, 2 * Pg, Uapi.RegisterModeMissing, out _);
        Assert.Equal(new FillResult(Errno.OK, 4096), u.Move(m.Mm, d, s, Pg, 0));
        Assert.Equal(pfn, m.Pagemap(d) & Uapi.PmPfnMask);
        Assert.Equal(0UL, m.Pagemap(s));
        Assert.Equal(new FillResult(Errno.ENOENT, -2), u.Move(m.Mm, d + Pg, s, Pg, 0));
        Assert.Equal(new FillResult(Errno.OK, 4096), u.Move(m.Mm, d + Pg, s, Pg, Uapi.MoveModeAllowSrcHoles));
        var fork = new ForkOp();
        m.K.Start(m.T, fork);
        var other = m.Map(1);
        u.Register(other, Pg, Uapi.RegisterModeMissing, out _);
        Assert.Equal(new FillResult(Errno.EBUSY, -16), u.Move(m.Mm, other, s + Pg, Pg, 0));
        fork.Child!.Exit();
        Assert.Equal(new FillResult(Errno.EBUSY, -16), u.Move(m.Mm, other, s + Pg, Pg, 0));
        Assert.Equal(new FillResult(Errno.EINVAL, null), u.Move(fork.Child, other, s + Pg, Pg, 0));
    }

    [Fact]
    public void A_fault_blocks_until_woken_and_mmap_changing_gives_eagain()
    {
        var m = new Machine();
        var a = m.Map(2);
        var u = m.Uffd(UffdFeatures.EventRemove);
        u.Register(a, 2 * Pg, Uapi.RegisterModeMissing, out _);
        var read = m.Read(a);
        Assert.False(read.IsCompleted);
        Assert.Equal(ThreadState.BlockedInUserfault, m.T.State);
        Assert.Equal((true, false), u.Poll());
        Assert.Equal(Errno.OK, u.Read(out var msg));
        Assert.Equal(UffdEvent.Pagefault, msg!.Event);
        Assert.Equal(PagefaultFlags.None, msg.Flags);
        Assert.Equal(a, msg.Address);
        Assert.False(read.IsCompleted);
        Assert.Equal(Errno.OK, u.Zeropage(a, Pg, Uapi.ZeropageModeDontwake).Errno);
        Assert.False(read.IsCompleted);
        Assert.Equal(Errno.OK, u.Wake(a, Pg));
        Assert.True(read.IsCompleted);
        Assert.Equal(SigCode.None, read.Signal);

        var t2 = m.K.CreateThread(m.Mm);
        var madv = new MadviseOp(a, Pg, Madv.Dontneed);
        m.K.Start(t2, madv);
        Assert.Equal(ThreadState.BlockedOnEvent, t2.State);
        Assert.True(m.PteAt(a).Present);
        Assert.Equal(new FillResult(Errno.EAGAIN, -11), u.Copy(a + Pg, new byte[Pg], 0x1000, Pg, 0));
        Assert.Equal(Errno.EAGAIN, u.Writeprotect(a, Pg, 0));
        Assert.Equal(Errno.OK, u.Wake(a, Pg));
        Assert.Equal(Errno.OK, u.Read(out msg));
        Assert.Equal(UffdEvent.Remove, msg!.Event);
        Assert.True(madv.IsCompleted);
        Assert.False(m.PteAt(a).Present);
        Assert.Equal(0, u.MmapChanging);
    }

    [Fact]
    public void Close_wakes_blocked_faults_and_resets_uffd_wp()
    {
        var m = new Machine();
        var a = m.Map(1);
        m.Write(a, 1);
        var u = m.Uffd();
        u.Register(a, Pg, Uapi.RegisterModeWp, out _);
        u.Writeprotect(a, Pg, Uapi.WriteprotectModeWp);
        var w = m.Write(a, 2);
        Assert.False(w.IsCompleted);
        u.Release();
        Assert.True(w.IsCompleted);
        Assert.False(m.PteAt(a).UffdWp);
        Assert.Null(m.Mm.VmaLookup(a)!.UffdCtx);
    }

    [Fact]
    public void Unregister_wakes_missing_waiters_but_not_wp_waiters()
    {
        var m = new Machine();
        var a = m.Map(1);
        var b = m.Map(1);
        m.Write(b, 1);
        var u = m.Uffd();
        u.Register(a, Pg, Uapi.RegisterModeMissing, out _);
        u.Register(b, Pg, Uapi.RegisterModeWp, out _);
        u.Writeprotect(b, Pg, Uapi.WriteprotectModeWp);
        var t2 = m.K.CreateThread(m.Mm);
        var r = m.Read(a);
        var w = m.Write(b, 2, t: t2);
        Assert.False(r.IsCompleted || w.IsCompleted);
        u.Unregister(a, Pg);
        Assert.True(r.IsCompleted);
        u.Unregister(b, Pg);
        Assert.False(w.IsCompleted);
        Assert.False(m.PteAt(b).UffdWp);
        u.Wake(b, Pg);
        Assert.True(w.IsCompleted);
    }

    /// <summary>The seed commit's four steps (spec §2.4) at the model API.</summary>
    [Theory]
    [InlineData(KernelProfile.V6_18)]
    [InlineData(KernelProfile.V5_7)]
    public void Seed_story_uffd_wp_before_cow(KernelProfile profile)
    {
        var m = new Machine(profile);
        var a = m.Map(1);
        m.Write(a, 0x11);
        var x = m.PageAt(a);
        var u = m.Uffd();
        u.Register(a, Pg, Uapi.RegisterModeWp, out _);
        var fork = new ForkOp();
        m.K.Start(m.T, fork);
        Assert.Equal(Errno.OK, u.Writeprotect(a, Pg, Uapi.WriteprotectModeWp));

        // 1. the parent's write raises WRITE|WP first, before any COW decision
        var w = m.Write(a, 0x22);
        Assert.False(w.IsCompleted);
        Assert.Equal(Errno.OK, u.Read(out var msg));
        Assert.Equal(PagefaultFlags.Write | PagefaultFlags.Wp, msg!.Flags);
        Assert.Equal(x.Pfn, m.Pagemap(a) & Uapi.PmPfnMask);

        // 2.-4. unprotect (W stays clear: X is shared), the retry COWs into X'
        Assert.Equal(Errno.OK, u.Writeprotect(a, Pg, 0));
        Assert.True(w.IsCompleted);
        Assert.NotEqual(x.Pfn, m.Pagemap(a) & Uapi.PmPfnMask);
        Assert.Equal(0x22, m.Read(a).Values[0]);
        Assert.Equal(0x11, m.Read(a, t: fork.ChildThread).Values[0]);
        Assert.Equal(x.Pfn, m.Pagemap(a, fork.Child) & Uapi.PmPfnMask);
    }

    [Fact]
    public void V57_resolve_keeps_write_clear_and_the_retry_reuses_the_page()
    {
        var m = new Machine(KernelProfile.V5_7);
        var a = m.Map(1);
        m.Write(a, 0x11);
        var x = m.PageAt(a);
        var u = m.Uffd();
        u.Register(a, Pg, Uapi.RegisterModeWp, out _);
        u.Writeprotect(a, Pg, Uapi.WriteprotectModeWp);
        u.Writeprotect(a, Pg, 0);
        Assert.False(m.PteAt(a).Write);
        Assert.False(m.PteAt(a).UffdWp);
        m.Write(a, 0x22);
        Assert.Equal(x.Pfn, m.Pagemap(a) & Uapi.PmPfnMask);
        Assert.True(m.PteAt(a).Write);

        var v6 = new Machine();
        var b = v6.Map(1);
        v6.Write(b, 0x11);
        var u6 = v6.Uffd();
        u6.Register(b, Pg, Uapi.RegisterModeWp, out _);
        u6.Writeprotect(b, Pg, Uapi.WriteprotectModeWp);
        u6.Writeprotect(b, Pg, 0);
        Assert.True(v6.PteAt(b).Write);
    }

    [Fact]
    public void V57_fork_child_keeps_stale_uffd_wp_but_v6_drops_it()
    {
        foreach (var (profile, expectWp) in new[] { (KernelProfile.V5_7, true), (KernelProfile.V6_18, false) })
        {
            var m = new Machine(profile);
            var a = m.Map(1);
            m.Write(a, 1);
            var u = m.Uffd();
            u.Register(a, Pg, Uapi.RegisterModeWp, out _);
            u.Writeprotect(a, Pg, Uapi.WriteprotectModeWp);
            var fork = new ForkOp();
            m.K.Start(m.T, fork);
            Assert.Equal(expectWp, m.PteAt(a, fork.Child).UffdWp);
            Assert.False(fork.Child!.VmaLookup(a)!.UserfaultfdWp);
            Assert.True(m.Write(a, 2, t: fork.ChildThread).IsCompleted);
        }
    }

    [Fact]
    public void V57_has_no_minor_poison_or_move()
    {
        var m = new Machine(KernelProfile.V5_7);
        var a = m.Map(1);
        var u = m.Uffd();
        Assert.Equal(Errno.EINVAL, u.Register(a, Pg, Uapi.RegisterModeMinor, out _));
        Assert.Equal(Errno.OK, u.Register(a, Pg, Uapi.RegisterModeWp, out var io));
        Assert.Equal(Uapi.RangeIoctlsV57, io);
        Assert.Equal(Errno.EINVAL, u.Poison(a, Pg, 0).Errno);
        Assert.Equal(Errno.EINVAL, u.Api(Uapi.UffdApi, 0, out _, out _));
        Assert.Equal(Errno.EINVAL, m.Uffd().Api(Uapi.UffdApi, 0, out _, out _));
        Assert.Equal(0x1ffUL, (ulong)UserfaultfdCtx.AvailableFeatures(KernelProfile.V5_7));
    }
}
