using System.Reflection;
using UffdGrpc.Mm;
using ThreadState = UffdGrpc.Mm.ThreadState;

namespace UffdGrpc.UnitTests;

/// <summary><see cref="Kernel.CheckInvariants"/>: silent on every state the model reaches, loud on a corrupted one.</summary>
public class InvariantTests
{
    private const ulong Pg = Machine.Pg;

    private static void Ok(Machine m, string when)
    {
        var v = m.K.CheckInvariants();
        Assert.True(v.Count == 0, $"{when}: {string.Join("; ", v)}");
    }

    private static void Run(Machine m, SyscallOp op, SimThread? t = null)
    {
        m.K.Start(t ?? m.T, op);
        Assert.True(op.IsCompleted);
    }

    [Fact]
    public void A_fresh_machine_holds()
    {
        var m = new Machine();
        Ok(m, "fresh");
        Assert.Equal(0, m.K.LiveFrames);
    }

    [Fact]
    public void Fork_and_cow_keep_map_counts_and_frames()
    {
        var m = new Machine();
        var a = m.Map(8);
        m.Write(a, 0x11, count: 8);
        m.Read(a + (8 * Pg) - Pg);
        Ok(m, "after writes");
        var fork = new ForkOp();
        Run(m, fork);
        Ok(m, "after fork");
        Assert.Equal(2, m.PageAt(a).MapCount);
        m.Write(a, 0x22, t: fork.ChildThread);
        Ok(m, "after cow in the child");
        Run(m, new MunmapOp(a, 8 * Pg));
        Ok(m, "after the parent's munmap");
        Assert.Equal(8, m.K.LiveFrames);
        fork.Child!.Exit();
        Ok(m, "after the child's exit");
        Assert.Equal(0, m.K.LiveFrames);
    }

    [Fact]
    public void Thp_pmd_mapping_fork_split_and_unmap_hold()
    {
        var m = new Machine();
        var a = m.Map(1024);
        Run(m, new MadviseOp(a, 1024 * Pg, Madv.Hugepage));
        m.Write(a, 0x11);
        m.Read(a + (512 * Pg));
        Assert.True(m.K.Locked(() => m.Mm.PageTable.HugePmdOf(a)).TransHuge);
        Ok(m, "after a THP fault and a huge zero page read");
        var fork = new ForkOp();
        Run(m, fork);
        Ok(m, "after fork");
        Assert.Equal(Errno.OK, m.Mm.Mprotect(a + Pg, Pg, Prot.Read));
        Ok(m, "after a split by mprotect");
        m.Write(a + (3 * Pg), 0x33, t: fork.ChildThread);
        Ok(m, "after cow of a subpage in the child");
        Run(m, new MunmapOp(a, 4 * Pg));
        Ok(m, "after a partial munmap");
        fork.Child!.Exit();
        Run(m, new MunmapOp(a, 1024 * Pg));
        Ok(m, "after unmapping everything");
        Assert.Equal(0, m.K.LiveFrames);
    }

    [Fact]
    public void Swap_out_dup_on_fork_and_swap_in_hold()
    {
        var m = new Machine(config: new MachineConfig { Swap = true });
        var a = m.Map(4);
        m.Write(a, 0x5a, count: 4);
        Run(m, new MadviseOp(a, 4 * Pg, Madv.Pageout));
        Assert.True(m.PteAt(a).IsSwap);
        Assert.Equal(4, m.K.SwapSlotsInUse);
        Ok(m, "after pageout");
        var fork = new ForkOp();
        Run(m, fork);
        Ok(m, "after fork (swap entries duplicated)");
        m.Read(a, t: fork.ChildThread);
        Ok(m, "after a swap-in by the child (page in the swap cache)");
        m.Write(a + Pg, 0x6b);
        Ok(m, "after a write swap-in by the parent");
        fork.Child!.Exit();
        Ok(m, "after the child's exit");
        Run(m, new MunmapOp(a, 4 * Pg));
        Ok(m, "after munmap");
        Assert.Equal(0, m.K.LiveFrames);
        Assert.Equal(0, m.K.SwapSlotsInUse);
    }

    [Fact]
    public void Shmem_page_cache_and_pins_are_references()
    {
        var m = new Machine(config: new MachineConfig { Swap = true });
        var f = m.K.CreateFile("memfd", shmem: true, 4 * Pg);
        var a = m.Map(4, shared: true, file: f);
        m.Write(a, 0x11, count: 4);
        Ok(m, "after writes to a memfd");
        Run(m, new MunmapOp(a, 4 * Pg));
        Ok(m, "after munmap (the memfd's page cache keeps its pages)");
        Assert.Equal(4, m.K.LiveFrames);
    }

    [Fact]
    public void Shared_anonymous_memory_is_freed_with_its_last_mapping()
    {
        var m = new Machine();
        var a = m.Map(4, shared: true);
        m.Write(a, 0x11, count: 4);
        var fork = new ForkOp();
        Run(m, fork);
        Ok(m, "after fork of a shared anonymous mapping");
        Run(m, new MunmapOp(a, 4 * Pg));
        Ok(m, "after the parent's munmap (the child still maps it)");
        Assert.Equal(4, m.K.LiveFrames);
        fork.Child!.Exit();
        Ok(m, "after the last mapping went away");
        Assert.Equal(0, m.K.LiveFrames);
    }

    [Fact]
    public void Mremap_to_a_destination_inside_the_same_vma_keeps_the_vmas_ordered()
    {
        // Found by the fuzzer (seed 4kcSdrAvkaS6): the VMA looked up before the destination
        // was unmapped was the lower piece of the split, and the move cut an inverted VMA.
        var m = new Machine();
        var a = m.Map(1024);
        m.Write(a + (600 * Pg), 0x5a, count: 2);
        var op = new MremapOp(a + (600 * Pg), 2 * Pg, a + (16 * Pg));
        Run(m, op);
        Assert.Equal(Errno.OK, op.Result);
        Ok(m, "after mremap inside one VMA");
        Assert.Equal(0x5a, m.Read(a + (17 * Pg)).Values[0]);
        Assert.Null(m.Mm.VmaLookup(a + (600 * Pg)));
    }

    [Fact]
    public void Blocked_faults_are_counted_per_uffd()
    {
        var m = new Machine();
        var a = m.Map(2);
        var u = m.Uffd();
        Assert.Equal(Errno.OK, u.Register(a, 2 * Pg, Uapi.RegisterModeMissing, out _));
        var t2 = m.K.CreateThread(m.Mm);
        var r1 = m.Read(a);
        var r2 = m.Read(a + Pg, t: t2);
        Assert.Equal(ThreadState.BlockedInUserfault, m.T.State);
        Assert.Equal(2, u.BlockedFaults);
        Ok(m, "with two blocked faults");
        Assert.Equal(Errno.OK, u.Read(out _));
        Ok(m, "after reading one");
        Assert.Equal(Errno.OK, u.Zeropage(a, Pg, 0).Errno);
        Assert.True(r1.IsCompleted);
        Ok(m, "after resolving one");
        u.Release();
        Assert.True(r2.IsCompleted);
        Ok(m, "after close");
    }

    [Fact]
    public void A_corrupted_map_count_and_frame_count_are_reported()
    {
        var m = new Machine();
        var a = m.Map(1);
        m.Write(a, 0x11);
        var page = m.PageAt(a);
        var mapCount = typeof(Page).GetProperty(nameof(Page.MapCount))!;
        mapCount.SetValue(page, 2);
        var v = m.K.CheckInvariants();
        Assert.Contains(v, s => s.Contains("MapCount 2, but 1 PTEs map it", StringComparison.Ordinal));

        mapCount.SetValue(page, 1);
        Ok(m, "repaired");
        var live = typeof(Kernel).GetField("_liveFrames", BindingFlags.NonPublic | BindingFlags.Instance)!;
        live.SetValue(m.K, 7L);
        Assert.Contains(m.K.CheckInvariants(), s => s.Contains("LiveFrames 7, but 1 frames are allocated", StringComparison.Ordinal));
        live.SetValue(m.K, 1L);

        // A frame nothing refers to: the PTE is cleared behind the model's back.
        m.K.Locked(() => m.Mm.PageTable.PteTableOf(a)!.Entries[PageTable.PteIndex(a)] = Pte.None);
        v = m.K.CheckInvariants();
        Assert.Contains(v, s => s.Contains("(leak)", StringComparison.Ordinal));
        Assert.Contains(v, s => s.Contains("MapCount 1, but 0 PTEs map it", StringComparison.Ordinal));
    }
}
