using System.Diagnostics;

namespace UffdGrpc.Mm;

/// <summary>
/// An address space (mm_struct): a sorted set of non-overlapping VMAs and an x86-64 page
/// table. The methods are split by kernel source file: Mm.Mmap (mm/mmap.c, mm/vma.c),
/// Mm.Fault (mm/memory.c, mm/huge_memory.c), Mm.Mprotect (mm/mprotect.c), Mm.Madvise
/// (mm/madvise.c, zap), Mm.Fork (kernel/fork.c), Mm.Mremap (mm/mremap.c), Mm.Proc
/// (fs/proc/task_mmu.c) and Mm.Userfaultfd (mm/userfaultfd.c).
/// </summary>
/// <remarks>
/// Every member is protected by <see cref="Kernel.Lock"/>; methods ending in
/// <c>Locked</c> expect it held. Invariants: VMAs are page aligned, sorted and disjoint;
/// a present PTE or huge PMD exists only inside a VMA; a VMA has a uffd context iff it
/// has a VM_UFFD_* flag (U1).
/// </remarks>
public sealed partial class Mm
{
    private readonly List<Vma> _vmas = [];

    internal Mm(Kernel kernel, int id)
    {
        Kernel = kernel;
        Id = id;
        PageTable = new PageTable(kernel.AccountPgtable);
    }

    public Kernel Kernel { get; }
    public int Id { get; }
    public PageTable PageTable { get; }
    public IReadOnlyList<Vma> Vmas => _vmas;
    public List<SimThread> Threads { get; } = [];
    /// <summary>The mm has exited (exit_mmap ran); uffd ioctls on it fail.</summary>
    public bool Exited { get; private set; }

    private bool IsV6 => Kernel.IsV6;

    [Conditional("DEBUG")]
    private void AssertLocked() => Debug.Assert(Monitor.IsEntered(Kernel.Lock));

    // ------------------------------------------------------------------ VMA set

    /// <summary>find_vma: the first VMA with End &gt; <paramref name="addr"/>.</summary>
    public Vma? FindVma(ulong addr)
    {
        var i = IndexOfFirstEndAbove(addr);
        return i < _vmas.Count ? _vmas[i] : null;
    }

    /// <summary>vma_lookup: the VMA containing <paramref name="addr"/>.</summary>
    public Vma? VmaLookup(ulong addr)
    {
        var v = FindVma(addr);
        return v is not null && v.Start <= addr ? v : null;
    }

    /// <summary>The VMAs intersecting [start, end), in address order (a snapshot).</summary>
    public List<Vma> VmasIn(ulong start, ulong end)
    {
        var list = new List<Vma>();
        for (var i = IndexOfFirstEndAbove(start); i < _vmas.Count && _vmas[i].Start < end; i++)
            list.Add(_vmas[i]);
        return list;
    }

    private int IndexOfFirstEndAbove(ulong addr)
    {
        int lo = 0, hi = _vmas.Count;
        while (lo < hi)
        {
            var mid = (lo + hi) / 2;
            if (_vmas[mid].End <= addr)
                lo = mid + 1;
            else
                hi = mid;
        }
        return lo;
    }

    private Vma? Prev(Vma v)
    {
        var i = _vmas.IndexOf(v);
        return i > 0 ? _vmas[i - 1] : null;
    }

    private Vma? Next(Vma v)
    {
        var i = _vmas.IndexOf(v);
        return i >= 0 && i + 1 < _vmas.Count ? _vmas[i + 1] : null;
    }

    internal void InsertVma(Vma v)
    {
        var i = IndexOfFirstEndAbove(v.Start);
        _vmas.Insert(i, v);
    }

    internal void RemoveVma(Vma v) => _vmas.Remove(v);

    /// <summary>
    /// __split_vma: splits <paramref name="vma"/> at <paramref name="addr"/> and returns the
    /// upper part. A huge PMD straddling the new boundary is split first
    /// (vma_adjust_trans_huge).
    /// </summary>
    internal Vma SplitVma(Vma vma, ulong addr)
    {
        Debug.Assert(addr > vma.Start && addr < vma.End && addr % Kernel.PageSize == 0);
        if (addr % Kernel.PmdSize != 0)
            SplitHugePmdAt(vma, addr);
        var upper = vma.CloneRange(addr, vma.End);
        vma.End = addr;
        InsertVma(upper);
        return upper;
    }

    /// <summary>
    /// is_mergeable_vma + anon_vma compatibility: two adjacent VMAs merge when they differ
    /// at most in VM_SOFTDIRTY, map the same file contiguously and share the uffd context.
    /// </summary>
    private static bool CanMerge(Vma a, Vma b)
    {
        if (a.End != b.Start)
            return false;
        if ((a.Flags & ~VmFlags.SoftDirty) != (b.Flags & ~VmFlags.SoftDirty))
            return false;
        if (a.File != b.File || a.UffdCtx != b.UffdCtx)
            return false;
        if (a.PgOff + a.Pages != b.PgOff)
            return false;
        return a.AnonVma is null || b.AnonVma is null || a.AnonVma == b.AnonVma;
    }

    /// <summary>vma_merge: merges <paramref name="vma"/> with its neighbours where Linux would.</summary>
    internal Vma MergeVma(Vma vma)
    {
        var prev = Prev(vma);
        if (prev is not null && CanMerge(prev, vma))
        {
            prev.End = vma.End;
            prev.Flags |= vma.Flags & VmFlags.SoftDirty;
            if (prev.AnonVma is null)
                (prev.AnonVma, prev.AnonVmaChainSingular) = (vma.AnonVma, vma.AnonVmaChainSingular);
            RemoveVma(vma);
            vma = prev;
        }
        var next = Next(vma);
        if (next is not null && CanMerge(vma, next))
        {
            vma.End = next.End;
            vma.Flags |= next.Flags & VmFlags.SoftDirty;
            if (vma.AnonVma is null)
                (vma.AnonVma, vma.AnonVmaChainSingular) = (next.AnonVma, next.AnonVmaChainSingular);
            RemoveVma(next);
        }
        return vma;
    }

    /// <summary>
    /// vma_modify: isolates [start, end) of <paramref name="vma"/> as its own VMA (splitting
    /// at the edges) so that its flags can change; the caller merges afterwards.
    /// </summary>
    internal Vma IsolateRange(Vma vma, ulong start, ulong end)
    {
        if (start > vma.Start)
            vma = SplitVma(vma, start);
        if (end < vma.End)
            SplitVma(vma, end);
        return vma;
    }

    // ------------------------------------------------------------------ page protection

    /// <summary>
    /// vma_wants_writenotify: a shared writable mapping needs write faults when the file
    /// has page_mkwrite (regular files), when soft-dirty tracking is active, or when the
    /// VMA is uffd-wp registered.
    /// </summary>
    internal bool WantsWriteNotify(Vma vma)
    {
        if ((vma.Flags & (VmFlags.Shared | VmFlags.Write)) != (VmFlags.Shared | VmFlags.Write))
            return false;
        if (vma.File is { IsShmem: false })
            return true;
        if (SoftDirtyEnabled(vma))
            return true;
        return vma.UserfaultfdWp;
    }

    /// <summary>vma_soft_dirty_enabled: tracking is on when configured and VM_SOFTDIRTY is clear.</summary>
    internal bool SoftDirtyEnabled(Vma vma) => Kernel.Config.SoftDirty && (vma.Flags & VmFlags.SoftDirty) == 0;

    /// <summary>pte_needs_soft_dirty_wp.</summary>
    internal bool NeedsSoftDirtyWp(Vma vma, Pte pte) => SoftDirtyEnabled(vma) && !pte.SoftDirty;

    /// <summary>
    /// vm_get_page_prot + vma_set_page_prot: the protection bits the kernel puts in a new
    /// PTE. Private mappings never carry write (COW grants it per PTE); shared writable
    /// mappings carry it unless write-notify is needed. PROT_NONE uses _PAGE_PROTNONE.
    /// </summary>
    internal ulong PageProt(Vma vma)
    {
        var f = vma.Flags;
        if ((f & VmFlags.AccessFlags) == 0)
            return PteBits.PageProtNone | PteBits.PageAccessed;
        var prot = PteBits.PagePresent | PteBits.PageUser | PteBits.PageAccessed;
        if ((f & VmFlags.Exec) == 0)
            prot |= PteBits.PageNx;
        if ((f & (VmFlags.Shared | VmFlags.Write)) == (VmFlags.Shared | VmFlags.Write) && !WantsWriteNotify(vma))
            prot |= PteBits.PageRw;
        return prot;
    }

    /// <summary>mk_pte(page, vma->vm_page_prot).</summary>
    internal Pte MkPte(Page page, Vma vma) => new((page.Pfn << Kernel.PageShift) | PageProt(vma));

    /// <summary>maybe_mkwrite: sets write when the VMA has VM_WRITE.</summary>
    internal static Pte MaybeMkWrite(Pte pte, Vma vma) => (vma.Flags & VmFlags.Write) != 0 ? pte.MkWrite() : pte;

    /// <summary>
    /// Models anon_vma_prepare (mm/rmap.c): a VMA without an anon_vma takes a neighbour's
    /// (find_mergeable_anon_vma) or a new one.
    /// </summary>
    internal static void AnonVmaPrepare(Vma vma)
    {
        if (vma.AnonVma is not null)
            return;
        vma.AnonVma = vma.Mm.FindMergeableAnonVma(vma) ?? new AnonVma();
        vma.AnonVmaChainSingular = true;
    }

    /// <summary>Models find_mergeable_anon_vma (mm/vma.c): the next VMA first, then the previous one.</summary>
    private AnonVma? FindMergeableAnonVma(Vma vma)
    {
        if (Next(vma) is { } next && ReusableAnonVma(next, vma, next) is { } av)
            return av;
        return Prev(vma) is { } prev ? ReusableAnonVma(prev, prev, vma) : null;
    }

    /// <summary>Models reusable_anon_vma: <paramref name="old"/>'s anon_vma, if its chain is singular.</summary>
    private static AnonVma? ReusableAnonVma(Vma old, Vma a, Vma b) =>
        AnonVmaCompatible(a, b) && old.AnonVma is { } av && old.AnonVmaChainSingular ? av : null;

    /// <summary>
    /// Models anon_vma_compatible: adjacent, same file, flags equal but for the access bits
    /// and VM_SOFTDIRTY, contiguous pgoff (the model has no mempolicies).
    /// </summary>
    private static bool AnonVmaCompatible(Vma a, Vma b) =>
        a.End == b.Start && a.File == b.File
        && ((a.Flags ^ b.Flags) & ~(VmFlags.AccessFlags | VmFlags.SoftDirty)) == 0
        && b.PgOff == a.PgOff + ((b.Start - a.Start) / Kernel.PageSize);

    // ------------------------------------------------------------------ rmap helpers

    /// <summary>Maps a fresh exclusive anon page (folio_add_new_anon_rmap, RMAP_EXCLUSIVE).</summary>
    internal static void AddNewAnonRmap(Page page)
    {
        page.Kind = PageKind.Anon;
        page.MapCount = 1;
        page.AnonExclusive = true;
    }

    /// <summary>Adds one PTE mapping of <paramref name="page"/> in this mm (folio_add_*_rmap_pte / folio_dup_*_rmap_pte).</summary>
    internal void AddRmap(Page page)
    {
        if (page.IsZeroPage)
            return;
        page.MapCount++;
        page.Folio?.Track(this, 1);
    }

    /// <summary>Drops one PTE mapping of <paramref name="page"/> (folio_remove_rmap_pte) and frees it when unused.</summary>
    internal void RemoveRmap(Page page)
    {
        if (page.IsZeroPage)
            return;
        page.Folio?.Track(this, -1);
        page.MapCount--;
        Debug.Assert(page.MapCount >= 0);
        Kernel.MaybeFree(page);
    }

    /// <summary>The page a present PTE maps, or null for the zero page (vm_normal_page).</summary>
    internal Page? NormalPage(Pte pte) => pte.Special ? null : Kernel.PageOf(pte.Pfn);

    /// <summary>The page a present PTE maps, the zero page included.</summary>
    internal Page PteToPage(Pte pte) => Kernel.PageOf(pte.Pfn) ?? throw new InvalidOperationException($"no frame {pte.Pfn:x}");
}
