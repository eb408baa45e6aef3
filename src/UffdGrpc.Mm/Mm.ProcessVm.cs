namespace UffdGrpc.Mm;

/// <summary>One <c>struct iovec</c>: a base address and a length (iov_len, read as ssize_t by the checks).</summary>
public readonly record struct IoVec(ulong Base, ulong Len);

/// <summary>
/// process_vm_readv(2)/process_vm_writev(2) (mm/process_vm_access.c): the argument checks
/// of process_vm_rw, the remote side's pin_user_pages_remote (mm/gup.c, FOLL_PIN |
/// FOLL_TOUCH | FOLL_REMOTE, FOLL_WRITE for writev, unlockable so a userfault sleeps) and
/// the local side's copy_page_to_iter/copy_page_from_iter (lib/iov_iter.c), which are
/// kernel-origin accesses of the caller's own memory.
/// </summary>
public sealed partial class Mm
{
    /// <summary>UIO_MAXIOV.</summary>
    public const int UioMaxIov = 1024;
    /// <summary>MAX_RW_COUNT: INT_MAX rounded down to a page.</summary>
    public const ulong MaxRwCount = 0x7fff_f000;
    /// <summary>PVM_MAX_KMALLOC_PAGES / sizeof(struct page *): pages pinned per loop of process_vm_rw_single_vec.</summary>
    public const int PvmMaxPagesPerLoop = (int)(2 * Kernel.PageSize / 8);

    /// <summary>
    /// Models the checks of process_vm_rw before process_vm_rw_core: flags must be 0
    /// (EINVAL); import_iovec of the local vector (more than UIO_MAXIOV entries or a
    /// negative iov_len: EINVAL; a segment beyond the user address limit: EFAULT; lengths
    /// are clamped to MAX_RW_COUNT in total); an empty local total returns 0 at once;
    /// iovec_from_user of the remote vector (EINVAL as for the local one, no address
    /// check). The caller then computes nr_pages: all-empty remote vectors return 0 before
    /// the pid is looked up.
    /// </summary>
    internal static Errno ProcessVmRwCheck(ulong flags, IoVec[] local, IoVec[] remote, out IoVec[] clampedLocal, out ulong total)
    {
        clampedLocal = local;
        total = 0;
        if (flags != 0)
            return Errno.EINVAL;
        var r = ImportIovec(local, out clampedLocal, out total);
        if (r != Errno.OK || total == 0)
            return r;
        return IovecFromUser(remote);
    }

    /// <summary>Models import_iovec (lib/iov_iter.c): iovec_from_user, then access_ok and the MAX_RW_COUNT clamp per segment.</summary>
    private static Errno ImportIovec(IoVec[] vec, out IoVec[] clamped, out ulong total)
    {
        clamped = vec;
        total = 0;
        var r = IovecFromUser(vec);
        if (r != Errno.OK)
            return r;
        clamped = new IoVec[vec.Length];
        for (var i = 0; i < vec.Length; i++)
        {
            var len = vec[i].Len;
            if (!AccessOk(vec[i].Base, len))
                return Errno.EFAULT;
            if (len > MaxRwCount - total)
                len = MaxRwCount - total;
            clamped[i] = vec[i] with { Len = len };
            total += len;
        }
        return Errno.OK;
    }

    /// <summary>Models iovec_from_user: too many segments or a negative (ssize_t) iov_len is EINVAL.</summary>
    private static Errno IovecFromUser(IoVec[] vec)
    {
        if (vec.Length > UioMaxIov)
            return Errno.EINVAL;
        foreach (var v in vec)
        {
            if ((long)v.Len < 0)
                return Errno.EINVAL;
        }
        return Errno.OK;
    }

    /// <summary>access_ok on x86-64: the range must end at or below the user address limit.</summary>
    private static bool AccessOk(ulong addr, ulong len) => len <= Kernel.TaskSize && addr <= Kernel.TaskSize - len;

    /// <summary>The nr_pages computation of process_vm_rw_core: the most pages any non-empty remote segment spans (0: nothing to do).</summary>
    internal static ulong ProcessVmNrPages(IoVec[] remote)
    {
        ulong nr = 0;
        foreach (var v in remote)
        {
            if ((long)v.Len > 0)
                nr = Math.Max(nr, SpanPages(v.Base, v.Len));
        }
        return nr;
    }

    /// <summary>(addr + len - 1) / PAGE_SIZE - addr / PAGE_SIZE + 1.</summary>
    internal static ulong SpanPages(ulong addr, ulong len) =>
        ((addr + len - 1) / Kernel.PageSize) - (addr / Kernel.PageSize) + 1;

    /// <summary>
    /// Models one page of __get_user_pages for pin_user_pages_remote: the VMA lookup (a
    /// hole is EFAULT), check_vma_flags (FOLL_WRITE needs VM_WRITE, a read VM_READ; no
    /// FOLL_FORCE), then follow_page_mask or faultin_page until the page can be pinned.
    /// Faults are kernel-origin (no FAULT_FLAG_USER) and carry FAULT_FLAG_REMOTE, which
    /// handle_userfault does not look at: a userfault in <paramref name="t"/>'s name
    /// queues a message on this mm's context and parks the caller (FAULT_FLAG_ALLOW_RETRY
    /// from FOLL_UNLOCKABLE); the caller retries this page when woken. A read of an anon
    /// page that is not exclusive first unshares it (gup_must_unshare, FAULT_FLAG_UNSHARE).
    /// </summary>
    internal FaultResult PinUserPageRemote(SimThread t, ulong addr, bool write, out Page? page)
    {
        AssertLocked();
        page = null;
        var vma = VmaLookup(addr);
        if (vma is null)
            return FaultResult.SigSegvMaperr;
        if (write ? (vma.Flags & VmFlags.Write) == 0 : (vma.Flags & VmFlags.Read) == 0)
            return FaultResult.SigSegvAccerr;
        for (var tries = 0; tries < 64; tries++)
        {
            if (FollowPageMask(addr, write, pin: true, out page, out var unshare))
            {
                if (!page!.IsZeroPage)
                    page.Pins++;
                HasPinned = true;
                return FaultResult.Ok;
            }
            var r = unshare ? HandleUnshareFault(t, vma, addr) : HandleMmFault(t, addr, write, AccessOrigin.Kernel);
            _oomInjected = false;
            if (r != FaultResult.Ok || Exited)
                return Exited ? FaultResult.Oom : r;
        }
        throw new InvalidOperationException($"gup livelock at 0x{addr:x}");
    }

    /// <summary>
    /// unpin_user_pages_dirty_lock for one page: a writev dirties it (set_page_dirty_lock);
    /// a page unmapped while pinned is freed now.
    /// </summary>
    internal void UnpinUserPage(Page page, bool dirty)
    {
        if (page.IsZeroPage)
            return;
        if (dirty)
            page.Dirty = true;
        page.Pins--;
        if (page.Pins == 0)
            Kernel.MaybeFree(page);
    }

    /// <summary>
    /// handle_mm_fault with FAULT_FLAG_UNSHARE: a PMD-mapped THP whose only reference is
    /// this mapping is marked exclusive in place (do_huge_pmd_wp_page); otherwise the PMD
    /// is split and do_wp_page unshares the 4 KiB page (reuse or a read-only copy).
    /// </summary>
    private FaultResult HandleUnshareFault(SimThread t, Vma vma, ulong addr)
    {
        var pmdt = PageTable.PmdTableOf(addr, false);
        if (pmdt is null)
            return FaultResult.Ok;
        var pi = PageTable.PmdIndex(addr);
        var pmd = pmdt.Entries[pi];
        if (pmd.TransHuge)
        {
            var folio = Kernel.PageOf(pmd.Pfn)!.Folio!;
            if (folio.RefCount == 1)
            {
                foreach (var p in folio.Pages)
                    p.AnonExclusive = true;
                return FaultResult.Ok;
            }
            SplitHugePmd(vma, pmdt, pi, addr & Kernel.PmdMask);
        }
        var table = pmdt.Tables[pi];
        if (table is null || !table.Entries[PageTable.PteIndex(addr)].Present)
            return FaultResult.Ok;
        return DoWpPage(t, vma, table, addr, AccessOrigin.Kernel, unshare: true);
    }

    /// <summary>
    /// The page behind a user address whose entry is present (after a completed access).
    /// </summary>
    private Page PresentPageAt(ulong addr)
    {
        var pmdt = PageTable.PmdTableOf(addr, false)!;
        var pi = PageTable.PmdIndex(addr);
        var pmd = pmdt.Entries[pi];
        if (pmd.TransHuge)
            return Kernel.PageOf(pmd.Pfn)!.Folio!.Pages[PageTable.PteIndex(addr)];
        return PteToPage(pmdt.Tables[pi]!.Entries[PageTable.PteIndex(addr)]);
    }

    /// <summary>
    /// One chunk of copy_to_user (<paramref name="toUser"/>: readv) or copy_from_user
    /// (writev) between the pinned remote <paramref name="remote"/> page and the caller's
    /// memory at <paramref name="uaddr"/>, not crossing a local page: the first byte is a
    /// kernel-origin access through the fault path (it may fault, block in a userfault of
    /// this mm, or fail), and the rest of the page is then copied as the same access.
    /// </summary>
    internal FaultResult CopyUserChunk(SimThread t, ulong uaddr, Page remote, int offset, int len, bool toUser)
    {
        AssertLocked();
        var r = AccessByte(t, uaddr, toUser, AccessOrigin.Kernel, remote.ReadByte(offset), out var first);
        if (r != FaultResult.Ok)
            return r;
        var local = PresentPageAt(uaddr);
        var loff = (int)(uaddr & (Kernel.PageSize - 1));
        if (len <= 1)
        {
            if (!toUser)
                remote.Write(offset, [first]);
            return FaultResult.Ok;
        }
        Span<byte> chunk = stackalloc byte[(int)Kernel.PageSize];
        var rest = chunk[..(len - 1)];
        if (toUser)
        {
            remote.Read(offset + 1, rest);
            local.Write(loff + 1, rest);
        }
        else
        {
            remote.Write(offset, [first]);
            local.Read(loff + 1, rest);
            remote.Write(offset + 1, rest);
        }
        return FaultResult.Ok;
    }
}
