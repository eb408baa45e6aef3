using System.Globalization;

namespace UffdGrpc.Mm;

/// <summary>
/// The machine's self-check: every counter the model maintains incrementally is re-derived
/// from a fresh walk of the page tables, the page caches, the swap device and the threads,
/// and compared with what the model keeps.
/// </summary>
public sealed partial class Kernel
{
    /// <summary>
    /// Re-derives the model's bookkeeping from a fresh walk and returns every disagreement,
    /// human-readable (empty: every invariant holds). Takes the machine lock; it changes
    /// nothing. The invariants:
    /// <list type="bullet">
    /// <item>V: the VMAs of every mm are page aligned, non-empty, sorted, disjoint and below
    /// TASK_SIZE; a VMA has a uffd context iff it has a VM_UFFD_* flag, and that context is
    /// not released and belongs to the mm.</item>
    /// <item>P: a present PTE or huge PMD lies inside a VMA (a huge PMD's whole 2 MiB slot
    /// in one VMA) and points at an allocated frame (the zero page for a special PTE, the
    /// head of a PMD-sized folio for a huge PMD).</item>
    /// <item>M: each frame's <see cref="Page.MapCount"/> equals the PTEs that map it across
    /// all mms; each folio's <see cref="Folio.EntireMapCount"/> equals the huge PMDs that
    /// map it, and its per-mm count (<c>MmMaps</c>) equals that mm's PTE and PMD mappings of
    /// it.</item>
    /// <item>F: <see cref="LiveFrames"/> equals the allocated frames (the zero pages aside),
    /// and the allocated frames are exactly those still referenced: mapped, pinned, in a
    /// page cache, or in the swap cache of a slot some swap entry still refers to (a folio
    /// lives while any subpage does; the shmem of a shared anonymous mapping is referenced
    /// only by its VMAs). An allocated, unreferenced frame is a leak; a mapping, cache or
    /// swap-cache reference to a freed frame is dangling. The content slots in use are
    /// exactly those of live frames with contents (a freed frame gave its slot back).</item>
    /// <item>S: each swap slot's count equals the swap PTEs that point at it; a slot with no
    /// entry left exists only while its swap-cache page does, and the swap cache and its
    /// pages agree.</item>
    /// <item>U: each uffd's blocked-fault count equals the threads BlockedInUserfault on it;
    /// a released uffd has no sleeper.</item>
    /// </list>
    /// </summary>
    public IReadOnlyList<string> CheckInvariants()
    {
        using var _ = Enter();
        var v = new List<string>();
        void Add(string s)
        {
            if (v.Count < 200)
                v.Add(s);
        }
        string Hex(ulong x) => "0x" + x.ToString("x", CultureInfo.InvariantCulture);

        bool Allocated(ulong pfn, out Page? page)
        {
            page = PageOf(pfn);
            return page is not null;
        }

        var ptes = new Dictionary<Page, int>();
        var pmds = new Dictionary<Folio, int>();
        var folioMm = new Dictionary<(Folio, Mm), int>();
        var swapRefs = new Dictionary<ulong, int>();
        var mappedFiles = new HashSet<MemFile>();

        foreach (var mm in _mms)
        {
            var tag = $"mm {mm.Id}";
            // ---- V
            ulong prevEnd = 0;
            foreach (var vma in mm.Vmas)
            {
                if (vma.Start % PageSize != 0 || vma.End % PageSize != 0)
                    Add($"{tag}: VMA {vma} not page aligned");
                if (vma.End <= vma.Start)
                    Add($"{tag}: VMA {vma} empty or inverted");
                if (vma.End > TaskSize)
                    Add($"{tag}: VMA {vma} ends above TASK_SIZE");
                if (vma.Start < prevEnd)
                    Add($"{tag}: VMA {vma} overlaps or is out of order (previous end {Hex(prevEnd)})");
                if (vma.Mm != mm)
                    Add($"{tag}: VMA {vma} belongs to mm {vma.Mm.Id}");
                if ((vma.UffdCtx is not null) != vma.UserfaultfdArmed)
                    Add($"{tag}: VMA {vma} has uffd ctx {vma.UffdCtx?.Id.ToString(CultureInfo.InvariantCulture) ?? "none"} but flags {vma.Flags & VmFlags.UffdFlags}");
                if (vma.UffdCtx is { } c && (c.Released || c.Mm != mm))
                    Add($"{tag}: VMA {vma} registered with uffd {c.Id} (released {c.Released}, of mm {c.Mm.Id})");
                if (vma.File is { } f)
                    mappedFiles.Add(f);
                prevEnd = Math.Max(prevEnd, vma.End);
            }

            // ---- P, M, S (page-table walk)
            foreach (var slot in mm.PageTable.PopulatedSlots())
            {
                var pmdt = mm.PageTable.PmdTableOf(slot, false)!;
                var pi = PageTable.PmdIndex(slot);
                var pmd = pmdt.Entries[pi];
                if (!pmd.IsNone)
                {
                    var vma = mm.VmaLookup(slot);
                    if (vma is null || vma.End < slot + PmdSize)
                        Add($"{tag}: huge PMD at {Hex(slot)} not inside one VMA ({vma?.ToString() ?? "no VMA"})");
                    if (!pmd.TransHuge)
                    {
                        Add($"{tag}: PMD at {Hex(slot)} is neither none, a table nor huge ({pmd})");
                    }
                    else if (!Allocated(pmd.Pfn, out var head))
                    {
                        Add($"{tag}: huge PMD at {Hex(slot)} points at freed pfn {Hex(pmd.Pfn)} (dangling)");
                    }
                    else if (head!.Folio is not { } folio || folio.Head != head)
                    {
                        Add($"{tag}: huge PMD at {Hex(slot)} points at pfn {Hex(pmd.Pfn)}, not the head of a PMD folio");
                    }
                    else if (!folio.IsHugeZero)
                    {
                        pmds[folio] = pmds.GetValueOrDefault(folio) + 1;
                        folioMm[(folio, mm)] = folioMm.GetValueOrDefault((folio, mm)) + 1;
                    }
                    if (pmdt.Tables[pi] is not null)
                        Add($"{tag}: slot {Hex(slot)} has both a huge PMD and a PTE table");
                    continue;
                }
                var table = pmdt.Tables[pi]!;
                for (var i = 0; i < PtrsPerTable; i++)
                {
                    var pte = table.Entries[i];
                    if (pte.IsNone)
                        continue;
                    var addr = slot + ((ulong)i * PageSize);
                    if (pte.Present)
                    {
                        if (mm.VmaLookup(addr) is null)
                            Add($"{tag}: present PTE {pte} at {Hex(addr)} outside every VMA");
                        if (!Allocated(pte.Pfn, out var page))
                        {
                            Add($"{tag}: PTE at {Hex(addr)} maps freed pfn {Hex(pte.Pfn)} (dangling)");
                            continue;
                        }
                        if (pte.Special)
                        {
                            if (!page!.IsZeroPage)
                                Add($"{tag}: special PTE at {Hex(addr)} maps pfn {Hex(pte.Pfn)}, not a zero page");
                            continue;
                        }
                        if (page!.IsZeroPage)
                        {
                            // The zero page's mappings are not counted (AddRmap skips it).
                            continue;
                        }
                        ptes[page] = ptes.GetValueOrDefault(page) + 1;
                        if (page.Folio is { } folio)
                            folioMm[(folio, mm)] = folioMm.GetValueOrDefault((folio, mm)) + 1;
                    }
                    else if (pte.IsSwap)
                    {
                        swapRefs[pte.SwapSlot] = swapRefs.GetValueOrDefault(pte.SwapSlot) + 1;
                    }
                }
            }
        }

        // ---- M
        var folios = new HashSet<Folio>();
        long allocated = 0, withContents = 0;
        foreach (var (pfn, p) in _frames.Live())
        {
            if (p.Pfn != pfn)
                Add($"frame slot {Hex(pfn)} holds pfn {Hex(p.Pfn)}");
            if (p.HasContents)
                withContents++;
            if (p.IsZeroPage)
                continue;
            allocated++;
            var n = ptes.GetValueOrDefault(p);
            if (p.MapCount != n)
                Add($"pfn {Hex(p.Pfn)} ({p.Kind}): MapCount {p.MapCount}, but {n} PTEs map it");
            if (p.Pins < 0)
                Add($"pfn {Hex(p.Pfn)}: negative pin count {p.Pins}");
            if (p.Folio is { } f)
                folios.Add(f);
        }
        foreach (var f in folios)
        {
            var n = pmds.GetValueOrDefault(f);
            if (f.EntireMapCount != n)
                Add($"folio at pfn {Hex(f.Head.Pfn)}: EntireMapCount {f.EntireMapCount}, but {n} huge PMDs map it");
            foreach (var (mm, count) in f.MmMaps)
            {
                var walked = folioMm.GetValueOrDefault((f, mm));
                if (walked != count)
                    Add($"folio at pfn {Hex(f.Head.Pfn)}: mm {mm.Id} mapping count {count}, but the walk finds {walked}");
            }
        }
        foreach (var ((f, mm), count) in folioMm)
        {
            if (!f.MmMaps.ContainsKey(mm))
                Add($"folio at pfn {Hex(f.Head.Pfn)}: mm {mm.Id} maps it {count} times but is not among its MM ids");
        }

        // ---- F
        if (allocated != _liveFrames)
            Add($"LiveFrames {_liveFrames}, but {allocated} frames are allocated");
        if (withContents != _frames.Contents.UsedSlots)
            Add($"{_frames.Contents.UsedSlots} content slots are in use, but {withContents} live frames hold contents");

        var reachable = new HashSet<Page>();
        foreach (var p in ptes.Keys)
            reachable.Add(p);
        foreach (var f in pmds.Keys)
            reachable.Add(f.Head);
        foreach (var file in _files)
        {
            var anonShared = file.AnonymousShared;
            if (anonShared && !mappedFiles.Contains(file) && file.Cache.Count > 0)
                Add($"file {file.Id} ({file.Name}): the shmem of a shared anonymous mapping no VMA maps any more still holds {file.Cache.Count} page-cache pages (leak)");
            foreach (var (idx, page) in file.Cache)
            {
                if (PageOf(page.Pfn) != page)
                {
                    Add($"file {file.Id} page {idx}: page-cache pfn {Hex(page.Pfn)} is freed (dangling)");
                    continue;
                }
                if (page.Kind != PageKind.File || page.Mapping != file || page.Index != idx)
                    Add($"file {file.Id} page {idx}: cache pfn {Hex(page.Pfn)} is {page.Kind} of file {page.Mapping?.Id} index {page.Index}");
                reachable.Add(page);
            }
        }

        // ---- S
        foreach (var (id, s) in _swap)
        {
            var refs = swapRefs.GetValueOrDefault(id);
            if (s.Count != refs)
                Add($"swap slot {id}: count {s.Count}, but {refs} swap entries refer to it");
            if (s.Count <= 0 && s.Cache is null)
                Add($"swap slot {id}: no reference and no swap-cache page, yet not freed (leak)");
            if (s.Cache is { } cp)
            {
                if (PageOf(cp.Pfn) != cp)
                    Add($"swap slot {id}: swap-cache pfn {Hex(cp.Pfn)} is freed (dangling)");
                else if (cp.SwapCacheSlot != id)
                    Add($"swap slot {id}: swap-cache pfn {Hex(cp.Pfn)} says it caches slot {cp.SwapCacheSlot}");
                if (s.Count > 0)
                    reachable.Add(cp);
            }
        }
        foreach (var (id, refs) in swapRefs)
        {
            if (!_swap.ContainsKey(id))
                Add($"{refs} swap entries refer to freed swap slot {id} (dangling)");
        }

        foreach (var (_, p) in _frames.Live())
        {
            if (p.IsZeroPage)
                continue;
            if (p.Pins > 0)
                reachable.Add(p);
            if (p.SwapCacheSlot != 0 && (!_swap.TryGetValue(p.SwapCacheSlot, out var s) || s.Cache != p))
                Add($"pfn {Hex(p.Pfn)}: in the swap cache of slot {p.SwapCacheSlot}, which does not hold it");
        }
        var liveFolios = new HashSet<Folio>();
        foreach (var p in reachable)
        {
            if (p.Folio is { } f)
                liveFolios.Add(f);
        }
        var leaks = new List<ulong>();
        foreach (var (_, p) in _frames.Live())
        {
            if (p.IsZeroPage || p.HwPoison)
                continue;
            if (reachable.Contains(p) || (p.Folio is { } f && liveFolios.Contains(f)))
                continue;
            leaks.Add(p.Pfn);
        }
        if (leaks.Count > 0)
        {
            var first = leaks[0];
            var page = PageOf(first)!;
            Add($"{leaks.Count} allocated frames nothing references (leak), e.g. pfn {Hex(first)} ({page.Kind}, mapcount {page.MapCount}, pins {page.Pins}, swap cache {page.SwapCacheSlot}, file {page.Mapping?.Id.ToString(CultureInfo.InvariantCulture) ?? "-"})");
        }

        // ---- U
        var blocked = new Dictionary<UserfaultfdCtx, int>();
        foreach (var mm in _mms)
        {
            foreach (var t in mm.Threads)
            {
                if (t.State == ThreadState.BlockedInUserfault)
                {
                    if (t.BlockedOn is null)
                        Add($"thread {t.Tid}: blocked in a userfault on no uffd");
                    else
                        blocked[t.BlockedOn] = blocked.GetValueOrDefault(t.BlockedOn) + 1;
                }
                if (t.IsBlocked && t.Op is null)
                    Add($"thread {t.Tid}: {t.State} with no operation");
                if (t.Mm != mm)
                    Add($"thread {t.Tid}: listed in mm {mm.Id} but belongs to mm {t.Mm.Id}");
            }
            var live = mm.Threads.Count(x => x.State != ThreadState.Exited);
            if (mm.LiveThreads != live)
                Add($"mm {mm.Id}: counts {mm.LiveThreads} live threads, but {live} have not exited");
        }
        foreach (var ctx in _ctxs)
        {
            var n = blocked.GetValueOrDefault(ctx);
            if (ctx.BlockedFaults != n)
                Add($"uffd {ctx.Id}: {ctx.BlockedFaults} blocked faults, but {n} threads sleep in a userfault on it");
            if (ctx.Released && (ctx.BlockedFaults > 0 || n > 0))
                Add($"uffd {ctx.Id}: released with {Math.Max(ctx.BlockedFaults, n)} sleepers");
        }
        foreach (var (ctx, n) in blocked)
        {
            if (!_ctxs.Contains(ctx))
                Add($"{n} threads sleep on uffd {ctx.Id}, unknown to the machine");
        }
        return v;
    }
}
