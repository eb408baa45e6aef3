using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

public class PteTests
{
    [Fact]
    public void Bit_positions_are_the_x86_ones()
    {
        Assert.Equal(0, PteBits.Present);
        Assert.Equal(1, PteBits.Rw);
        Assert.Equal(2, PteBits.User);
        Assert.Equal(5, PteBits.Accessed);
        Assert.Equal(6, PteBits.Dirty);
        Assert.Equal(7, PteBits.Pse);
        Assert.Equal(10, PteBits.UffdWp);
        Assert.Equal(11, PteBits.SoftDirty);
        Assert.Equal(63, PteBits.Nx);
        Assert.Equal(1UL << 1, PteBits.SwpSoftDirty);
        Assert.Equal(1UL << 2, PteBits.SwpUffdWp);
    }

    public static TheoryData<ulong> AllFlagCombinations()
    {
        var d = new TheoryData<ulong>();
        ulong[] bits = [PteBits.PageRw, PteBits.PageDirty, PteBits.PageAccessed, PteBits.PageUffdWp, PteBits.PageSoftDirty];
        for (var m = 0; m < 1 << bits.Length; m++)
        {
            ulong v = PteBits.PagePresent | PteBits.PageUser | (0x1234UL << 12);
            for (var i = 0; i < bits.Length; i++)
            {
                if ((m & (1 << i)) != 0)
                    v |= bits[i];
            }
            d.Add(v);
        }
        return d;
    }

    [Theory]
    [MemberData(nameof(AllFlagCombinations))]
    public void MkUffdWp_sets_uffd_wp_and_clears_write(ulong value)
    {
        var p = new Pte(value).MkUffdWp();
        Assert.True(p.UffdWp);
        Assert.False(p.Write);
        Assert.Equal(value & ~(PteBits.PageRw | PteBits.PageUffdWp), p.Value & ~(PteBits.PageRw | PteBits.PageUffdWp));
    }

    [Theory]
    [MemberData(nameof(AllFlagCombinations))]
    public void ClearUffdWp_leaves_write_alone(ulong value)
    {
        var p = new Pte(value);
        var c = p.ClearUffdWp();
        Assert.False(c.UffdWp);
        Assert.Equal(p.Write, c.Write);
        Assert.Equal(p.Dirty, c.Dirty);
    }

    [Theory]
    [MemberData(nameof(AllFlagCombinations))]
    public void Modify_keeps_the_chg_mask_including_uffd_wp(ulong value)
    {
        var p = new Pte(value);
        var readOnly = PteBits.PagePresent | PteBits.PageUser | PteBits.PageAccessed | PteBits.PageNx;
        var m = p.Modify(readOnly);
        Assert.Equal(p.UffdWp, m.UffdWp);
        Assert.Equal(p.SoftDirty, m.SoftDirty);
        Assert.Equal(p.Dirty, m.Dirty);
        Assert.Equal(p.Pfn, m.Pfn);
        Assert.False(m.Write);
        Assert.True(p.Modify(readOnly | PteBits.PageRw).Write);
    }

    [Theory]
    [MemberData(nameof(AllFlagCombinations))]
    public void MkDirty_sets_soft_dirty_too_and_hardware_dirty_is_separate(ulong value)
    {
        var p = new Pte(value).MkDirty();
        Assert.True(p.Dirty);
        Assert.True(p.SoftDirty);
        Assert.Equal(new Pte(value).SoftDirty, new Pte(value).MkClean().SoftDirty);
    }

    [Fact]
    public void Write_helpers_truth_table()
    {
        var p = Pte.FromPfn(42);
        Assert.True(p.Present);
        Assert.False(p.Write);
        Assert.True(p.MkWrite().Write);
        Assert.False(p.MkWrite().Wrprotect().Write);
        Assert.True(p.MkYoung().Young);
        Assert.False(p.MkYoung().MkOld().Young);
        Assert.True(p.MkSpecial().Special);
        Assert.Equal(42UL, p.Pfn);
    }

    [Fact]
    public void Prot_none_entry_is_present_but_not_usable_by_the_mmu()
    {
        var p = Pte.FromPfn(7).Modify(PteBits.PageProtNone | PteBits.PageAccessed);
        Assert.True(p.Present);
        Assert.False(p.HwPresent);
    }

    [Fact]
    public void Swap_entries_carry_uffd_wp_soft_dirty_and_exclusive()
    {
        var s = Pte.SwapEntry(99);
        Assert.True(s.IsSwap);
        Assert.False(s.Present);
        Assert.False(s.IsMarker);
        Assert.Equal(99UL, s.SwapSlot);
        var w = s.SwpMkUffdWp().SwpMkSoftDirty().SwpMkExclusive();
        Assert.True(w.SwpUffdWp);
        Assert.True(w.SwpSoftDirty);
        Assert.True(w.SwpExclusive);
        Assert.True(w.AnyUffdWp);
        Assert.False(w.SwpClearUffdWp().SwpUffdWp);
        Assert.Equal(99UL, w.SwapSlot);
    }

    [Fact]
    public void Markers_are_swap_like_and_distinguishable()
    {
        var wp = Pte.Marker(PteMarker.UffdWp);
        var poison = Pte.Marker(PteMarker.Poisoned);
        var guard = Pte.Marker(PteMarker.Guard);
        Assert.True(wp.IsMarker && wp.IsSwapLike && !wp.IsSwap);
        Assert.True(wp.IsUffdWpMarker && !wp.IsPoisonMarker);
        Assert.True(poison.IsPoisonMarker && !poison.IsUffdWpMarker);
        Assert.True(guard.IsGuardMarker);
        Assert.True(wp.AnyUffdWp);
        Assert.False(poison.AnyUffdWp);
        Assert.True(poison.SwpMkUffdWp().SwpUffdWpAny);
    }

    [Fact]
    public void Pmd_helpers_mirror_the_pte_ones()
    {
        var h = Pmd.Huge(512).MkWrite().MkDirty();
        Assert.True(h.TransHuge);
        Assert.True(h.Write);
        Assert.True(h.SoftDirty);
        var w = h.MkUffdWp();
        Assert.True(w.UffdWp);
        Assert.False(w.Write);
        Assert.True(w.Modify(PteBits.PagePresent | PteBits.PageUser).UffdWp);
        Assert.True(w.Modify(PteBits.PagePresent | PteBits.PageUser).TransHuge);
        Assert.False(w.ClearUffdWp().UffdWp);
    }

    [Fact]
    public void Errno_values_are_the_linux_ones()
    {
        Assert.Equal(1, (int)Errno.EPERM);
        Assert.Equal(2, (int)Errno.ENOENT);
        Assert.Equal(3, (int)Errno.ESRCH);
        Assert.Equal(11, (int)Errno.EAGAIN);
        Assert.Equal(12, (int)Errno.ENOMEM);
        Assert.Equal(14, (int)Errno.EFAULT);
        Assert.Equal(16, (int)Errno.EBUSY);
        Assert.Equal(17, (int)Errno.EEXIST);
        Assert.Equal(22, (int)Errno.EINVAL);
        Assert.Equal("ok", Errno.OK.Name());
        Assert.Equal("E#99", ((Errno)99).Name());
    }

    [Fact]
    public void Uapi_values_are_frozen()
    {
        Assert.Equal((byte)0x12, (byte)UffdEvent.Pagefault);
        Assert.Equal((byte)0x16, (byte)UffdEvent.Unmap);
        Assert.Equal(0x8000_0000_0000_0003UL, Uapi.ApiIoctls);
        Assert.Equal(0x1ffffUL, (ulong)UserfaultfdCtx.AvailableFeatures(KernelProfile.V6_18));
        Assert.Equal(1UL << 57, Uapi.PmUffdWp);
    }
}
