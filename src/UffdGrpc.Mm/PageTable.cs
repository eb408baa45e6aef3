namespace UffdGrpc.Mm;

/// <summary>The lowest level: 512 PTEs covering 2 MiB.</summary>
public sealed class PteTable
{
    public readonly Pte[] Entries = new Pte[Kernel.PtrsPerTable];
}

/// <summary>
/// A PMD table: 512 slots of 2 MiB, each empty, a huge PMD (<see cref="Entries"/>) or a
/// pointer to a <see cref="PteTable"/> (<see cref="Tables"/>).
/// </summary>
/// <remarks>
/// The kernel's PMD table is one page of 512 entries, each a huge PMD or a table pointer.
/// Here the pointers are one array and the huge PMDs another, allocated when the first huge
/// PMD is set, so a table without THPs costs what the kernel's does (one 4 KiB array).
/// </remarks>
public sealed class PmdTable
{
    internal PmdTable(PageTable? owner) => Tables = new PteSlots(owner);

    public readonly PmdEntries Entries = new();
    public readonly PteSlots Tables;
}

/// <summary>The 512 huge-PMD values of a <see cref="PmdTable"/>; none until one is set.</summary>
public sealed class PmdEntries
{
    private Pmd[]? _entries;

    public Pmd this[int i]
    {
        get => _entries is null ? default : _entries[i];
        set
        {
            if (_entries is null)
            {
                if (value.IsNone)
                    return;
                _entries = new Pmd[Kernel.PtrsPerTable];
            }
            _entries[i] = value;
        }
    }
}

/// <summary>
/// The 512 PTE-table pointers of a <see cref="PmdTable"/>. Installing a table where there
/// was none, or clearing one, is counted in the owning page table (mm_inc_nr_ptes /
/// mm_dec_nr_ptes), which charges or frees a page-table frame of the machine.
/// </summary>
public sealed class PteSlots
{
    private readonly PteTable?[] _slots = new PteTable?[Kernel.PtrsPerTable];
    private readonly PageTable? _owner;

    internal PteSlots(PageTable? owner) => _owner = owner;

    public PteTable? this[int i]
    {
        get => _slots[i];
        set
        {
            var old = _slots[i];
            _slots[i] = value;
            if (old is null && value is not null)
                _owner?.Account(1);
            else if (old is not null && value is null)
                _owner?.Account(-1);
        }
    }
}

/// <summary>
/// x86-64 4-level page table (pgd → pud → pmd → pte). Levels are allocated on first use,
/// so a sparse address space costs nothing until touched, and a walk allocates nothing.
/// </summary>
public sealed class PageTable
{
    private readonly PmdTable?[]?[] _pgd = new PmdTable?[]?[Kernel.PtrsPerTable];
    private readonly Action<int>? _account;

    /// <summary>A page table whose table pages are not charged to any machine.</summary>
    public PageTable()
    {
    }

    /// <summary>A page table that reports each table page it gains or frees to <paramref name="account"/>.</summary>
    internal PageTable(Action<int> account) => _account = account;

    /// <summary>
    /// Page-table pages in use below the PGD (mm_pgtables_bytes / PAGE_SIZE): PUD, PMD and
    /// PTE tables. The PGD itself is part of the mm, as pgd_alloc is not counted there.
    /// </summary>
    public long Pages { get; private set; }

    /// <summary>
    /// Steps taken by the range walks over this table so far (PMD steps, hole steps, the
    /// per-entry steps of move_page_tables): what a range operation cost, for the tests that
    /// show it follows what is mapped and not the length asked.
    /// </summary>
    public long WalkSteps { get; internal set; }

    internal void Account(int delta)
    {
        Pages += delta;
        _account?.Invoke(delta);
    }

    /// <summary>free_pgd_range for the whole address space (exit_mmap → free_pgtables): every table is freed.</summary>
    internal void FreeAll()
    {
        for (var g = 0; g < Kernel.PtrsPerTable; g++)
        {
            if (_pgd[g] is not { } pud)
                continue;
            for (var u = 0; u < Kernel.PtrsPerTable; u++)
            {
                if (pud[u] is not { } pmdt)
                    continue;
                for (var m = 0; m < Kernel.PtrsPerTable; m++)
                    pmdt.Tables[m] = null;
                pud[u] = null;
                Account(-1);
            }
            _pgd[g] = null;
            Account(-1);
        }
    }

    /// <summary>PGDIR_SIZE and PUD_SIZE of x86-64 4-level paging (the P4D is folded).</summary>
    private const ulong PgdirSize = 1UL << 39, PudSize = 1UL << 30;

    private static int PgdIndex(ulong addr) => (int)((addr >> 39) & 511);
    private static int PudIndex(ulong addr) => (int)((addr >> 30) & 511);
    public static int PmdIndex(ulong addr) => (int)((addr >> 21) & 511);
    public static int PteIndex(ulong addr) => (int)((addr >> 12) & 511);

    /// <summary>pmd_offset after pud_alloc when <paramref name="alloc"/> is set.</summary>
    public PmdTable? PmdTableOf(ulong addr, bool alloc)
    {
        var pud = _pgd[PgdIndex(addr)];
        if (pud is null)
        {
            if (!alloc)
                return null;
            pud = _pgd[PgdIndex(addr)] = new PmdTable?[Kernel.PtrsPerTable];
            Account(1);
        }
        var pmd = pud[PudIndex(addr)];
        if (pmd is null && alloc)
        {
            pmd = pud[PudIndex(addr)] = new PmdTable(this);
            Account(1);
        }
        return pmd;
    }

    /// <summary>
    /// The end of the empty upper-level range that holds <paramref name="addr"/>: pgd_addr_end
    /// when its PGD entry is none, pud_addr_end when its PUD entry is none (0 when a PMD table
    /// covers it). mm/pagewalk.c's walk_pgd_range and walk_pud_range pass such a range to
    /// pte_hole in one call, and the range loops skip it in one step, so a walk costs what the
    /// tables hold, not what the range spans. Saturates at the top of the address space.
    /// </summary>
    public ulong UpperHoleEnd(ulong addr)
    {
        ulong size;
        if (_pgd[PgdIndex(addr)] is not { } pud)
            size = PgdirSize;
        else if (pud[PudIndex(addr)] is null)
            size = PudSize;
        else
            return 0;
        var next = (addr & ~(size - 1)) + size;
        return next == 0 ? ulong.MaxValue : next;
    }

    /// <summary>The PTE table of <paramref name="addr"/>, if one exists.</summary>
    public PteTable? PteTableOf(ulong addr) => PmdTableOf(addr, false)?.Tables[PmdIndex(addr)];

    /// <summary>The huge PMD of <paramref name="addr"/>, or none.</summary>
    public Pmd HugePmdOf(ulong addr) => PmdTableOf(addr, false)?.Entries[PmdIndex(addr)] ?? default;

    /// <summary>Models pte_alloc: the PTE table of <paramref name="addr"/>, allocated if the PMD is none.
    /// Returns null when the slot holds a huge PMD.</summary>
    public PteTable? PteAlloc(ulong addr)
    {
        var pmdt = PmdTableOf(addr, true)!;
        var i = PmdIndex(addr);
        if (!pmdt.Entries[i].IsNone)
            return null;
        return pmdt.Tables[i] ??= new PteTable();
    }

    public Pte GetPte(ulong addr) => PteTableOf(addr)?.Entries[PteIndex(addr)] ?? Pte.None;

    /// <summary>Frees the PTE table of the 2 MiB slot at <paramref name="addr"/> (free_pte_range).</summary>
    public void FreePteTable(ulong addr)
    {
        var pmdt = PmdTableOf(addr, false);
        if (pmdt is not null)
            pmdt.Tables[PmdIndex(addr)] = null;
    }

    /// <summary>Walks [start, end) PMD by PMD (allocating upper levels when <paramref name="alloc"/>).</summary>
    public PmdWalk Walk(ulong start, ulong end, bool alloc = false) => new(this, start, end, alloc);

    /// <summary>Enumerates the 2 MiB slots that have a PTE table or a huge PMD.</summary>
    public IEnumerable<ulong> PopulatedSlots()
    {
        for (var g = 0; g < Kernel.PtrsPerTable; g++)
        {
            var pud = _pgd[g];
            if (pud is null)
                continue;
            for (var u = 0; u < Kernel.PtrsPerTable; u++)
            {
                var pmdt = pud[u];
                if (pmdt is null)
                    continue;
                for (var m = 0; m < Kernel.PtrsPerTable; m++)
                {
                    if (pmdt.Tables[m] is not null || !pmdt.Entries[m].IsNone)
                        yield return ((ulong)g << 39) | ((ulong)u << 30) | ((ulong)m << 21);
                }
            }
        }
    }
}

/// <summary>One PMD-sized piece [Addr, End) of a page-table walk (pmd_addr_end), with its PMD slot.</summary>
public readonly record struct PmdStep(ulong Addr, ulong End, PmdTable? Table, int Index)
{
    /// <summary>The slot holds a huge PMD.</summary>
    public bool IsHuge => Table is not null && Table.Entries[Index].TransHuge;
    /// <summary>The slot's PTE table, if any.</summary>
    public PteTable? PteTable => Table?.Tables[Index];
    /// <summary>The piece covers the whole 2 MiB slot.</summary>
    public bool CoversPmd => End - Addr == Kernel.PmdSize;
}

/// <summary>
/// A walk over [start, end) in PMD-sized steps (the do/while of the kernel's
/// change_pmd_range, zap_pmd_range, …), except that a range without a PMD table (its PUD or
/// PGD entry none) is one step with no table, as the upper levels' pud_none/pgd_none skip
/// it. The PMD table of each step is looked up when the step starts, so a body may split or
/// install entries in it.
/// </summary>
public struct PmdWalk(PageTable pt, ulong start, ulong end, bool alloc)
{
    private ulong _next = start;

    public PmdStep Current { get; private set; }

    public readonly PmdWalk GetEnumerator() => this;

    public bool MoveNext()
    {
        if (_next >= end)
            return false;
        var addr = _next;
        var table = pt.PmdTableOf(addr, alloc);
        // A step without a PMD table covers the whole empty PUD or PGD range (pte_hole of the
        // upper level); a step with one covers one PMD (pmd_addr_end).
        var stepEnd = Math.Min(table is null ? pt.UpperHoleEnd(addr) : (addr & Kernel.PmdMask) + Kernel.PmdSize, end);
        _next = stepEnd;
        pt.WalkSteps++;
        Current = new PmdStep(addr, stepEnd, table, PageTable.PmdIndex(addr));
        return true;
    }
}
