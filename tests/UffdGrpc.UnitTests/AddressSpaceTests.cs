using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

public class AddressSpaceTests
{
    private const ulong Pg = Machine.Pg;

    [Fact]
    public void Mprotect_splits_a_vma_and_restoring_merges_it()
    {
        var m = new Machine();
        var a = m.Map(4);
        Assert.Equal(Errno.OK, m.Mm.Mprotect(a + Pg, 2 * Pg, Prot.Read));
        var v = m.Mm.Vmas;
        Assert.Equal(3, v.Count);
        Assert.Equal("rw-p", v[0].PermString);
        Assert.Equal("r--p", v[1].PermString);
        Assert.Equal((a + Pg, a + (3 * Pg)), (v[1].Start, v[1].End));
        Assert.Equal(Errno.OK, m.Mm.Mprotect(a + Pg, 2 * Pg, Prot.Read | Prot.Write));
        Assert.Single(m.Mm.Vmas);
        Assert.Equal((a, a + (4 * Pg)), (m.Mm.Vmas[0].Start, m.Mm.Vmas[0].End));
    }

    [Fact]
    public void Mprotect_stops_at_a_hole_after_changing_what_came_before()
    {
        var m = new Machine();
        var a = m.Map(4);
        Assert.Equal(Errno.EINVAL, m.Mm.Mmap(a, 0, Prot.None, false, null, 0));
        m.K.Start(m.T, new MunmapOp(a + (2 * Pg), Pg));
        Assert.Equal(Errno.ENOMEM, m.Mm.Mprotect(a, 4 * Pg, Prot.Read));
        Assert.Equal("r--p", m.Mm.VmaLookup(a)!.PermString);
        Assert.Equal("rw-p", m.Mm.VmaLookup(a + (3 * Pg))!.PermString);
        Assert.Equal(Errno.EINVAL, m.Mm.Mprotect(a + 1, Pg, Prot.Read));
        Assert.Equal(Errno.OK, m.Mm.Mprotect(a, 0, Prot.Read));
    }

    [Fact]
    public void Mprotect_beyond_the_may_ceiling_is_eacces()
    {
        var m = new Machine();
        var f = m.K.CreateFile("ro", shmem: true, 4 * Pg);
        var a = 0x7e00_0000_0000UL;
        Assert.Equal(Errno.OK, m.Mm.Mmap(a, 4 * Pg, Prot.Read, true, f, 0, readOnlyFd: true));
        Assert.Equal(Errno.EACCES, m.Mm.Mprotect(a, Pg, Prot.Read | Prot.Write));
    }

    [Fact]
    public void Anonymous_read_maps_the_zero_page_and_a_write_copies_it()
    {
        var m = new Machine();
        var a = m.Map(2);
        Assert.Equal(0, m.Read(a).Values[0]);
        var pte = m.PteAt(a);
        Assert.True(pte.Special);
        Assert.Equal(m.K.ZeroPage.Pfn, pte.Pfn);
        Assert.False(pte.Write);
        m.Write(a, 0x11);
        var after = m.PteAt(a);
        Assert.NotEqual(m.K.ZeroPage.Pfn, after.Pfn);
        Assert.True(after.Write && after.Dirty && !after.Special);
        Assert.Equal(0x11, m.Read(a).Values[0]);
    }

    [Fact]
    public void Fork_write_protects_both_sides_and_cow_gives_each_its_own_page()
    {
        var m = new Machine();
        var a = m.Map(1);
        m.Write(a, 0x11);
        var page = m.PageAt(a);
        Assert.True(page.AnonExclusive);
        var fork = new ForkOp();
        m.K.Start(m.T, fork);
        var child = fork.Child!;
        Assert.False(m.PteAt(a).Write);
        Assert.False(m.PteAt(a, child).Write);
        Assert.False(page.AnonExclusive);
        Assert.Equal(2, page.MapCount);
        Assert.Equal(0UL, m.Pagemap(a) & Uapi.PmMmapExclusive);

        m.Write(a, 0x22, t: fork.ChildThread);
        Assert.NotEqual(page.Pfn, m.Pagemap(a, child) & Uapi.PmPfnMask);
        Assert.Equal(0x11, m.Read(a).Values[0]);
        Assert.Equal(0x22, m.Read(a, t: fork.ChildThread).Values[0]);
        Assert.NotEqual(0UL, m.Pagemap(a) & Uapi.PmMmapExclusive);

        // The parent's page is mapped once again: its write reuses it (refcount 1).
        m.Write(a, 0x33);
        Assert.Equal(page.Pfn, m.Pagemap(a) & Uapi.PmPfnMask);
        Assert.True(page.AnonExclusive);
    }

    [Fact]
    public void Munmap_leaves_a_maperr_hole_and_len_zero_is_einval()
    {
        var m = new Machine();
        var a = m.Map(3);
        var op = new MunmapOp(a + Pg, Pg);
        m.K.Start(m.T, op);
        Assert.Equal(Errno.OK, op.Result);
        Assert.Equal(2, m.Mm.Vmas.Count);
        Assert.Equal(SigCode.SegvMaperr, m.Read(a + Pg).Signal);
        var zero = new MunmapOp(a, 0);
        m.K.Start(m.T, zero);
        Assert.Equal(Errno.EINVAL, zero.Result);
    }

    [Fact]
    public void Access_checks_the_vma_permission_first()
    {
        var m = new Machine();
        var a = m.Map(2, Prot.Read);
        Assert.Equal(SigCode.SegvAccerr, m.Write(a, 1).Signal);
        m.Mm.Mprotect(a, Pg, Prot.None);
        Assert.Equal(SigCode.SegvAccerr, m.Read(a).Signal);
        var multi = m.Read(a + Pg, 2);
        Assert.Equal(SigCode.SegvMaperr, multi.Signal);
        Assert.Equal(1, multi.Done);
    }

    [Fact]
    public void Thp_fault_maps_a_pmd_and_partial_mprotect_splits_it_keeping_uffd_wp()
    {
        var m = new Machine();
        var a = m.Map(512);
        var madv = new MadviseOp(a, 512 * Pg, Madv.Hugepage);
        m.K.Start(m.T, madv);
        m.Write(a, 0x11);
        Assert.True(m.K.Locked(() => m.Mm.PageTable.HugePmdOf(a)).TransHuge);
        Assert.Equal(1, m.Mm.Smaps(a, a + 1)[0].PmdMapped);

        var u = m.Uffd();
        Assert.Equal(Errno.OK, u.Register(a, 512 * Pg, Uapi.RegisterModeWp, out _));
        Assert.Equal(Errno.OK, u.Writeprotect(a, 512 * Pg, Uapi.WriteprotectModeWp));
        Assert.True(m.K.Locked(() => m.Mm.PageTable.HugePmdOf(a)).UffdWp);

        Assert.Equal(Errno.OK, m.Mm.Mprotect(a, Pg, Prot.Read));
        Assert.False(m.K.Locked(() => m.Mm.PageTable.HugePmdOf(a)).TransHuge);
        for (ulong i = 0; i < 512; i++)
        {
            var pte = m.PteAt(a + (i * Pg));
            Assert.True(pte.UffdWp, $"subpage {i}");
            Assert.False(pte.Write);
        }
        var kpf = m.Mm.KpageFlags(m.Pagemap(a + (7 * Pg)) & Uapi.PmPfnMask);
        Assert.NotEqual(0UL, kpf & (1UL << Uapi.KpfThp));
    }

    [Fact]
    public void Pagemap_reports_present_exclusive_uffd_wp_swap_and_file_bits()
    {
        var m = new Machine();
        var a = m.Map(3);
        m.Write(a, 1);
        m.Read(a + Pg);
        var e = m.Pagemap(a);
        Assert.NotEqual(0UL, e & Uapi.PmPresent);
        Assert.NotEqual(0UL, e & Uapi.PmMmapExclusive);
        Assert.Equal(0UL, e & (Uapi.PmFile | Uapi.PmSwap | Uapi.PmUffdWp | Uapi.PmSoftDirty));
        var z = m.Pagemap(a + Pg);
        Assert.Equal(0UL, z & Uapi.PmMmapExclusive);
        Assert.NotEqual(0UL, m.Mm.KpageFlags(z & Uapi.PmPfnMask) & (1UL << Uapi.KpfZeroPage));
        Assert.Equal(0UL, m.Pagemap(a + (2 * Pg)));

        var u = m.Uffd(UffdFeatures.WpUnpopulated);
        u.Register(a, 3 * Pg, Uapi.RegisterModeWp, out _);
        u.Writeprotect(a, 3 * Pg, Uapi.WriteprotectModeWp);
        Assert.NotEqual(0UL, m.Pagemap(a) & Uapi.PmUffdWp);
        var marker = m.Pagemap(a + (2 * Pg));
        Assert.Equal(Uapi.PmSwap | Uapi.PmUffdWp, marker);

        var f = m.K.CreateFile("s", shmem: true, Pg);
        var s = m.Map(1, shared: true, file: f);
        m.Write(s, 2);
        Assert.NotEqual(0UL, m.Pagemap(s) & Uapi.PmFile);
    }

    [Fact]
    public void Soft_dirty_is_a_machine_setting()
    {
        var off = new Machine();
        var a = off.Map(1);
        off.Write(a, 1);
        Assert.Equal(0UL, off.Pagemap(a) & Uapi.PmSoftDirty);
        Assert.Equal(Errno.OK, off.Mm.ClearRefs("4"));
        Assert.True(off.PteAt(a).Write);
        Assert.Equal(Errno.EINVAL, off.Mm.ClearRefs("9"));

        var on = new Machine(config: new MachineConfig { SoftDirty = true });
        var b = on.Map(1);
        on.Write(b, 1);
        Assert.NotEqual(0UL, on.Pagemap(b) & Uapi.PmSoftDirty);
        Assert.Equal(Errno.OK, on.Mm.ClearRefs("4"));
        Assert.Equal(0UL, on.Pagemap(b) & Uapi.PmSoftDirty);
        Assert.False(on.PteAt(b).Write);
        on.Write(b, 2);
        Assert.NotEqual(0UL, on.Pagemap(b) & Uapi.PmSoftDirty);
    }

    [Fact]
    public void A_protection_change_over_a_populated_64_MiB_range_allocates_nothing_per_pte()
    {
        var m = new Machine();
        const ulong pages = 64UL << 20 >> 12;
        var a = m.Map(pages, populate: true);
        var vma = m.Mm.VmaLookup(a)!;
        Assert.True(m.PteAt(a + ((pages - 1) * Pg)).Present);
        lock (m.K.Lock)
        {
            // warm up the code paths (JIT) on a small range first
            m.Mm.ChangeProtection(vma, a, a + Pg, CpFlags.UffdWp);
            m.Mm.ChangeProtection(vma, a, a + Pg, CpFlags.UffdWpResolve | CpFlags.TryChangeWritable);
            var before = GC.GetAllocatedBytesForCurrentThread();
            var changed = m.Mm.ChangeProtection(vma, a, a + (pages * Pg), CpFlags.UffdWp);
            var mid = GC.GetAllocatedBytesForCurrentThread();
            m.Mm.ChangeProtection(vma, a, a + (pages * Pg), CpFlags.UffdWpResolve | CpFlags.TryChangeWritable);
            var after = GC.GetAllocatedBytesForCurrentThread();
            Assert.Equal((long)pages, changed);
            Assert.True(mid - before < 1024, $"protect allocated {mid - before} bytes for {pages} PTEs");
            Assert.True(after - mid < 1024, $"resolve allocated {after - mid} bytes for {pages} PTEs");
        }
        Assert.True(m.PteAt(a + (5 * Pg)).Write);
    }
}
