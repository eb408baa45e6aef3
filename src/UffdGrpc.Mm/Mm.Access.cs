using System.Diagnostics;

namespace UffdGrpc.Mm;

/// <summary>
/// The CPU side of an access: the MMU's check of the page-table entry and the copy of the
/// bytes (arch/x86/mm/fault.c's caller side; the fault handler is in Mm.Fault).
/// </summary>
public sealed partial class Mm
{
    /// <summary>
    /// One user or kernel access of the byte at <paramref name="addr"/> (see
    /// <see cref="AccessPage"/>); a read returns the byte in <paramref name="read"/>.
    /// </summary>
    internal FaultResult AccessByte(SimThread t, ulong addr, bool write, AccessOrigin origin, byte value, out byte read)
    {
        Span<byte> one = [value];
        var r = write ? AccessPage(t, addr, true, origin, one, default) : AccessPage(t, addr, false, origin, default, one);
        read = !write && r == FaultResult.Ok ? one[0] : (byte)0;
        return r;
    }

    /// <summary>
    /// Models the CPU's access to one page (a load/store, or the kernel's copy_to_user /
    /// copy_from_user through its exception table): the MMU either completes it, or raises
    /// a page fault and the fault handler (<see cref="HandleMmFault"/>, mm/memory.c) runs
    /// until the access completes, a signal results, or the thread must sleep in a
    /// userfault. The bytes are <paramref name="src"/> (a write) or <paramref name="dst"/>
    /// (a read), starting at <paramref name="addr"/> and not crossing its page.
    /// </summary>
    internal FaultResult AccessPage(SimThread t, ulong addr, bool write, AccessOrigin origin, ReadOnlySpan<byte> src, Span<byte> dst)
    {
        AssertLocked();
        Debug.Assert((addr & (Kernel.PageSize - 1)) + (ulong)(write ? src.Length : dst.Length) <= Kernel.PageSize);
        _oomRetries = 0;
        for (var tries = 0; tries < 64; tries++)
        {
            if (TryHwAccess(addr, write, src, dst))
                return FaultResult.Ok;
            _faulting = t;
            var r = HandleMmFault(t, addr, write, origin);
            _faulting = null;
            if (r == FaultResult.Oom && _oomInjected)
            {
                // An injected VM_FAULT_OOM: the allocator already ran the OOM killer, and
                // pagefault_out_of_memory (no memcg) only warns; a user fault retries. A
                // kernel access goes to its exception fixup (EFAULT), as any VM_FAULT_OOM.
                _oomInjected = false;
                if (origin == AccessOrigin.User && !Exited && t.State != ThreadState.Exited)
                {
                    _oomRetries++;
                    continue;
                }
            }
            // VM_FAULT_OOM → pagefault_out_of_memory: the allocation already ran the OOM
            // killer; a thread it killed dies on the way back (its operation is aborted).
            // With nothing killable the kernel panics ("System is deadlocked on memory");
            // the model ends the access with the OOM result instead (SIGBUS, or EFAULT).
            if (r != FaultResult.Ok || Exited)
                return Exited ? FaultResult.Oom : r;
        }
        throw new InvalidOperationException($"fault livelock at 0x{addr:x}");
    }

    private SimThread? _faulting;
    private bool _oomInjected;
    private int _oomRetries;

    /// <summary>
    /// <see cref="InjectSite.FaultOom"/>: the page the fault allocates (do_anonymous_page,
    /// do_cow_fault, do_swap_page, wp_page_copy) is not granted, as when the allocation fails
    /// after reclaim and the OOM killer: VM_FAULT_OOM. A rule that keeps firing on one access
    /// stops being eligible after 32 retries (the kernel would spin in the fault).
    /// </summary>
    private bool FaultOomInjected(ulong addr)
    {
        if (_oomRetries >= 32 || Kernel.Inject(InjectSite.FaultOom, this, null, _faulting, addr) is null)
            return false;
        _oomInjected = true;
        return true;
    }

    /// <summary>
    /// The MMU: a present entry allowing the access completes it, setting accessed (and
    /// dirty for a write; never soft-dirty, which only the kernel sets), and the bytes are
    /// copied to or from the page the entry maps.
    /// </summary>
    private bool TryHwAccess(ulong addr, bool write, ReadOnlySpan<byte> src, Span<byte> dst)
    {
        var pmdt = PageTable.PmdTableOf(addr, false);
        if (pmdt is null)
            return false;
        var pi = PageTable.PmdIndex(addr);
        var offset = (int)(addr & (Kernel.PageSize - 1));
        var pmd = pmdt.Entries[pi];
        Page page;
        if (pmd.TransHuge)
        {
            if (!pmd.HwPresent || (write && !pmd.Write))
                return false;
            pmdt.Entries[pi] = write ? new Pmd(pmd.Value | PteBits.PageDirty | PteBits.PageAccessed) : pmd.MkYoung();
            page = Kernel.PageOf(pmd.Pfn)!.Folio!.Pages[PageTable.PteIndex(addr)];
        }
        else
        {
            var table = pmdt.Tables[pi];
            if (table is null)
                return false;
            var ti = PageTable.PteIndex(addr);
            var pte = table.Entries[ti];
            if (!pte.HwPresent || (write && !pte.Write))
                return false;
            table.Entries[ti] = write ? new Pte(pte.Value | PteBits.PageDirty | PteBits.PageAccessed) : pte.MkYoung();
            page = PteToPage(pte);
        }
        if (write)
            page.Write(offset, src);
        else
            page.Read(offset, dst);
        return true;
    }

    /// <summary>follow_page_mask with FOLL_TOUCH (GUP for populate): a mapped page with the needed permission, marked young.</summary>
    internal bool GupFollow(ulong addr, bool write) => FollowPageMask(addr, write, pin: false, out _, out _);

    /// <summary>
    /// Models follow_page_mask with FOLL_TOUCH (and FOLL_PIN when <paramref name="pin"/>): a
    /// present entry that allows the access gives its page (the zero page for a zero-page
    /// entry) and is marked young. With FOLL_PIN, a read of an anon page without
    /// PageAnonExclusive needs an unshare fault first (gup_must_unshare).
    /// </summary>
    internal bool FollowPageMask(ulong addr, bool write, bool pin, out Page? page, out bool unshare)
    {
        page = null;
        unshare = false;
        var pmdt = PageTable.PmdTableOf(addr, false);
        if (pmdt is null)
            return false;
        var pi = PageTable.PmdIndex(addr);
        var pmd = pmdt.Entries[pi];
        if (pmd.TransHuge)
        {
            if (!pmd.HwPresent || (write && !pmd.Write))
                return false;
            if (pin)
            {
                var sub = Kernel.PageOf(pmd.Pfn)!.Folio!.Pages[PageTable.PteIndex(addr)];
                if (!write && sub.IsAnon && !sub.AnonExclusive)
                {
                    unshare = true;
                    return false;
                }
                page = sub;
            }
            pmdt.Entries[pi] = pmd.MkYoung();
            return true;
        }
        var table = pmdt.Tables[pi];
        if (table is null)
            return false;
        var i = PageTable.PteIndex(addr);
        var pte = table.Entries[i];
        if (!pte.HwPresent || (write && !pte.Write))
            return false;
        if (pin)
        {
            var p = PteToPage(pte);
            if (!write && p.IsAnon && !p.AnonExclusive)
            {
                unshare = true;
                return false;
            }
            page = p;
        }
        table.Entries[i] = pte.MkYoung();
        return true;
    }
}
