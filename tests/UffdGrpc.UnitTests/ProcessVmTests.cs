using UffdGrpc.Mm;
using ThreadState = UffdGrpc.Mm.ThreadState;

namespace UffdGrpc.UnitTests;

/// <summary>process_vm_readv/writev rules (mm/process_vm_access.c), as the x00-x07 goldens recorded them.</summary>
public class ProcessVmTests
{
    private const ulong Pg = Machine.Pg;

    private static ProcessVmOp Run(Machine m, Mm.Mm? remote, bool write, IoVec[] local, IoVec[] remoteVecs, ulong flags = 0, SimThread? t = null)
    {
        var op = new ProcessVmOp(remote, write, local, remoteVecs, flags);
        m.K.Start(t ?? m.T, op);
        return op;
    }

    private static IoVec V(ulong addr, ulong len) => new(addr, len);

    [Fact]
    public void Argument_checks_come_in_the_kernels_order()
    {
        var m = new Machine();
        var a = m.Map(2);
        var b = m.Map(2);
        Assert.Equal(Errno.EINVAL, Run(m, m.Mm, false, [V(a, Pg)], [V(b, Pg)], flags: 1).Result);
        Assert.Equal(Errno.EINVAL, Run(m, m.Mm, false, new IoVec[Mm.Mm.UioMaxIov + 1], [V(b, Pg)]).Result);
        Assert.Equal(Errno.EINVAL, Run(m, m.Mm, false, [V(a, Pg)], new IoVec[Mm.Mm.UioMaxIov + 1]).Result);
        Assert.Equal(Errno.EINVAL, Run(m, null, false, [V(a, Pg)], [V(b, unchecked((ulong)-1))]).Result);
        // An empty local total returns 0 before the remote vector and the pid are looked at.
        var empty = Run(m, null, false, [V(a, 0)], new IoVec[Mm.Mm.UioMaxIov + 1]);
        Assert.Equal((Errno.OK, 0UL), (empty.Result, empty.Transferred));
        // All-empty remote segments return 0 before the pid lookup.
        Assert.Equal(Errno.OK, Run(m, null, false, [V(a, Pg)], [V(b, 0)]).Result);
        Assert.Equal(Errno.ESRCH, Run(m, null, false, [V(a, Pg)], [V(b, Pg)]).Result);
        // access_ok on the local side only.
        Assert.Equal(Errno.EFAULT, Run(m, m.Mm, false, [V(Kernel.TaskSize - 1, 2)], [V(b, Pg)]).Result);
    }

    [Fact]
    public void Transfers_count_bytes_and_fail_only_when_nothing_moved()
    {
        var m = new Machine();
        var a = m.Map(4);
        var b = m.Map(4);
        m.Write(b, 0x11, 4);
        m.K.Start(m.T, new MunmapOp(b + (2 * Pg), Pg));
        var partial = Run(m, m.Mm, false, [V(a, 4 * Pg)], [V(b + 100, 4 * Pg)]);
        Assert.Equal((Errno.OK, (2 * Pg) - 100), (partial.Result, partial.Transferred));
        Assert.Equal(0x11, m.Read(a + Pg - 100).Values[0]);
        Assert.Equal(Errno.EFAULT, Run(m, m.Mm, false, [V(a, Pg)], [V(b + (2 * Pg), Pg)]).Result);
        // A later remote segment failing keeps the earlier bytes.
        var two = Run(m, m.Mm, true, [V(a, 3 * Pg)], [V(b, Pg), V(b + (2 * Pg), Pg), V(b + (3 * Pg), Pg)]);
        Assert.Equal((Errno.OK, Pg), (two.Result, two.Transferred));
        // A read-only remote page refuses FOLL_WRITE without FOLL_FORCE.
        Assert.Equal(Errno.OK, m.Mm.Mprotect(b, Pg, Prot.Read));
        Assert.Equal(Errno.EFAULT, Run(m, m.Mm, true, [V(a, Pg)], [V(b, Pg)]).Result);
        // The local copy faulting in a hole ends the transfer at the local page boundary.
        m.K.Start(m.T, new MunmapOp(a + Pg, Pg));
        var local = Run(m, m.Mm, false, [V(a, 2 * Pg)], [V(b + Pg, Pg), V(b + (3 * Pg), Pg)]);
        Assert.Equal((Errno.OK, Pg), (local.Result, local.Transferred));
    }

    [Fact]
    public void Remote_missing_fault_parks_the_caller_until_a_fill()
    {
        var m = new Machine();
        var a = m.Map(2);
        var b = m.Map(2);
        var u = m.Uffd(UffdFeatures.ThreadId);
        Assert.Equal(Errno.OK, u.Register(b, 2 * Pg, Uapi.RegisterModeMissing, out _));
        var op = Run(m, m.Mm, false, [V(a, 2 * Pg)], [V(b, 2 * Pg)]);
        Assert.False(op.IsCompleted);
        Assert.Equal(ThreadState.BlockedInUserfault, m.T.State);
        Assert.Equal(Errno.OK, u.Read(out var msg));
        Assert.Equal((PagefaultFlags.None, b), (msg!.Flags, msg.Address));
        var src = new byte[Pg];
        Array.Fill(src, (byte)0x55);
        m.K.Locked(() => u.Copy(b, src, 0x1000, Pg, 0));
        Assert.False(op.IsCompleted);
        m.K.Locked(() => u.Zeropage(b + Pg, Pg, 0));
        Assert.True(op.IsCompleted);
        Assert.Equal((Errno.OK, 2 * Pg), (op.Result, op.Transferred));
        Assert.Equal(0x55, m.Read(a).Values[0]);
        Assert.Equal(0, m.PageAt(b).Pins);
    }

    [Fact]
    public void Writev_blocks_on_uffd_wp_and_readv_does_not()
    {
        var m = new Machine();
        var a = m.Map(1);
        var b = m.Map(1);
        m.Write(a, 0x11);
        m.Write(b, 0x22);
        var u = m.Uffd();
        u.Register(b, Pg, Uapi.RegisterModeWp, out _);
        u.Writeprotect(b, Pg, Uapi.WriteprotectModeWp);
        Assert.True(Run(m, m.Mm, false, [V(a, Pg)], [V(b, Pg)]).IsCompleted);
        var w = Run(m, m.Mm, true, [V(a, Pg)], [V(b, Pg)]);
        Assert.False(w.IsCompleted);
        Assert.Equal(Errno.OK, u.Read(out var msg));
        Assert.Equal(PagefaultFlags.Write | PagefaultFlags.Wp, msg!.Flags);
        m.K.Locked(() => u.Writeprotect(b, Pg, 0));
        Assert.Equal((Errno.OK, Pg), (w.Result, w.Transferred));
        Assert.Equal(0x22, m.Read(b).Values[0]);
    }

    [Fact]
    public void Readv_pin_unshares_an_anon_page_shared_after_fork()
    {
        var m = new Machine();
        var a = m.Map(1);
        var b = m.Map(1);
        m.Write(b, 0x22);
        var page = m.PageAt(b);
        var fork = new ForkOp();
        m.K.Start(m.T, fork);
        var child = fork.Child!;
        var op = Run(m, child, false, [V(a, Pg)], [V(b, Pg)]);
        Assert.Equal(Pg, op.Transferred);
        // The child's page was copied (read-only, exclusive); the parent keeps the original.
        Assert.NotEqual(page.Pfn, m.Pagemap(b, child) & Uapi.PmPfnMask);
        Assert.False(m.PteAt(b, child).Write);
        Assert.NotEqual(0UL, m.Pagemap(b, child) & Uapi.PmMmapExclusive);
        Assert.Equal(page.Pfn, m.Pagemap(b) & Uapi.PmPfnMask);
        // Now mapped once, the parent's page is reused in place when pinned.
        Run(m, m.Mm, false, [V(a, Pg)], [V(b, Pg)], t: fork.ChildThread);
        Assert.Equal(page.Pfn, m.Pagemap(b) & Uapi.PmPfnMask);
        Assert.True(page.AnonExclusive);
    }
}
