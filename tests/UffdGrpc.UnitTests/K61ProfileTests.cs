using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>The 6.1 profile's differences from 6.18, one behaviour each (the traces are in tests/conformance/scenarios/k61).</summary>
public class K61ProfileTests
{
    private const ulong Pg = Machine.Pg;

    [Fact]
    public void Api_offers_0x1fff_and_refuses_the_newer_features()
    {
        Assert.Equal(0x1fffUL, (ulong)UserfaultfdCtx.AvailableFeatures(KernelProfile.V6_1));
        var m = new Machine(KernelProfile.V6_1);
        var a = m.Map(1);
        Assert.Equal(Errno.OK, m.K.Userfaultfd(m.Mm, Uapi.ONonblock, out var u));
        Assert.Equal(Errno.EINVAL, u!.Api(Uapi.UffdApi, (ulong)UffdFeatures.WpUnpopulated, out var f, out var io));
        Assert.Equal(0UL, f);
        Assert.Equal(0UL, io);
        Assert.Equal(Errno.EINVAL, u.Register(a, Pg, Uapi.RegisterModeWp, out _));
        Assert.Equal(Errno.OK, u.Api(Uapi.UffdApi, 0, out f, out _));
        Assert.Equal(0x1fffUL, f);
    }

    [Fact]
    public void Register_reports_no_move_or_poison_and_those_ioctls_are_unknown()
    {
        var m = new Machine(KernelProfile.V6_1);
        var a = m.Map(2);
        var u = m.Uffd();
        Assert.Equal(Errno.OK, u.Register(a, 2 * Pg, Uapi.RegisterModeMissing | Uapi.RegisterModeWp, out var io));
        Assert.Equal((1UL << Uapi.UffdioWake) | (1UL << Uapi.UffdioCopy) | (1UL << Uapi.UffdioZeropage) | (1UL << Uapi.UffdioWriteprotect), io);
        Assert.Equal(Errno.EINVAL, u.Poison(a, Pg, 0).Errno);
        Assert.Equal(Errno.EINVAL, u.Move(m.Mm, a, a + Pg, Pg, 0).Errno);
    }

    [Fact]
    public void Writeprotect_must_stay_in_one_vma_in_6_1_but_may_span_vmas_in_6_18()
    {
        foreach (var (profile, expected) in new[] { (KernelProfile.V6_1, Errno.ENOENT), (KernelProfile.V6_18, Errno.OK) })
        {
            var m = new Machine(profile);
            var a = m.Map(4);
            m.Write(a, 1, 4);
            var u = m.Uffd();
            Assert.Equal(Errno.OK, u.Register(a, 4 * Pg, Uapi.RegisterModeWp, out _));
            Assert.Equal(Errno.OK, m.Mm.Mprotect(a + (2 * Pg), 2 * Pg, Prot.Read));
            Assert.Equal(expected, u.Writeprotect(a, 4 * Pg, Uapi.WriteprotectModeWp));
            Assert.Equal(Errno.OK, u.Writeprotect(a, 2 * Pg, Uapi.WriteprotectModeWp));
            Assert.True(m.PteAt(a).UffdWp);
        }
    }

    [Fact]
    public void Continue_with_mode_wp_is_einval_with_the_field_untouched()
    {
        var m = new Machine(KernelProfile.V6_1);
        var f = m.K.CreateFile("s", shmem: true, Pg);
        var a = m.Map(1, shared: true, file: f);
        m.Write(a, 0x11);
        var u = m.Uffd(UffdFeatures.MinorShmem);
        Assert.Equal(Errno.OK, u.Register(a, Pg, Uapi.RegisterModeMinor | Uapi.RegisterModeWp, out _));
        Assert.Equal(FillResult.Untouched(Errno.EINVAL), u.Continue(a, Pg, Uapi.ContinueModeWp));
        Assert.Equal(Errno.EEXIST, u.Continue(a, Pg, 0).Errno);
    }

    [Fact]
    public void Unregister_through_another_uffd_drops_its_registration_in_6_1_only()
    {
        foreach (var (profile, expected) in new[] { (KernelProfile.V6_1, Errno.OK), (KernelProfile.V6_18, Errno.EINVAL) })
        {
            var m = new Machine(profile);
            var a = m.Map(1);
            var u0 = m.Uffd();
            var u1 = m.Uffd();
            Assert.Equal(Errno.OK, u0.Register(a, Pg, Uapi.RegisterModeMissing, out _));
            Assert.Equal(expected, u1.Unregister(a, Pg));
            Assert.Equal(expected == Errno.OK, m.Mm.VmaLookup(a)!.UffdCtx is null);
        }
    }

    [Fact]
    public void Soft_dirty_and_memory_failure_are_built_in()
    {
        var k = new Kernel(KernelProfile.V6_1);
        Assert.True(k.Config.SoftDirty);
        Assert.True(k.Config.MemoryFailure);
        Assert.Throws<ArgumentException>(() => k.Configure(c => c with { SoftDirty = false }));
        Assert.True(k.Config.SoftDirty);
        k.Configure(c => c with { Swap = true });
        Assert.True(k.Config.Swap);
        Assert.False(new Kernel().Config.SoftDirty);
    }

    [Fact]
    public void Mprotect_to_read_only_keeps_vm_account_in_6_1()
    {
        foreach (var (profile, keeps) in new[] { (KernelProfile.V6_1, true), (KernelProfile.V6_18, false) })
        {
            var m = new Machine(profile);
            var a = m.Map(2);
            Assert.Equal(Errno.OK, m.Mm.Mprotect(a, Pg, Prot.Read));
            Assert.Equal(keeps, (m.Mm.VmaLookup(a)!.Flags & VmFlags.Account) != 0);
        }
    }

    [Fact]
    public void A_fill_into_an_unregistered_vma_prepares_no_anon_vma_in_6_1()
    {
        foreach (var (profile, prepared) in new[] { (KernelProfile.V6_1, false), (KernelProfile.V6_18, true) })
        {
            var m = new Machine(profile);
            var a = m.Map(1);
            var u = m.Uffd();
            Assert.Equal(Errno.ENOENT, u.Zeropage(a, Pg, 0).Errno);
            Assert.Equal(prepared, m.Mm.VmaLookup(a)!.AnonVma is not null);
        }
    }
}
