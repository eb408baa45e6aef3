using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using UffdGrpc.Mm;

namespace UffdGrpc.Scenarios.Host;

/// <summary>
/// What <c>uffdgrpc probe</c> measures on a host, in a form the model can load
/// (<c>replay --profile-file</c>): the kernel's userfaultfd interface (UFFDIO_API features,
/// PAGEMAP_SCAN, the ioctls UFFDIO_REGISTER returns for each mode on each memory type), the
/// kernel config options the model has as settings (CONFIG_MEM_SOFT_DIRTY,
/// CONFIG_MEMORY_FAILURE), and the machine's knobs (THP mode and use_zero_page, whether a
/// read fault maps the zero page, swap). The same probe steps run on the model give a
/// built-in profile's values (<see cref="FromModel"/>), so the two compare field by field.
/// </summary>
public sealed record HostProfile
{
    /// <summary>The registration modes probed, by name (UFFDIO_REGISTER_MODE_*).</summary>
    public static readonly (string Name, ulong Mode)[] RegisterModes =
    [
        ("missing", Uapi.RegisterModeMissing),
        ("wp", Uapi.RegisterModeWp),
        ("minor", Uapi.RegisterModeMinor),
        ("missing|wp", Uapi.RegisterModeMissing | Uapi.RegisterModeWp),
        ("missing|minor", Uapi.RegisterModeMissing | Uapi.RegisterModeMinor),
        ("wp|minor", Uapi.RegisterModeWp | Uapi.RegisterModeMinor),
        ("missing|wp|minor", Uapi.RegisterModeMissing | Uapi.RegisterModeWp | Uapi.RegisterModeMinor),
    ];

    /// <summary>The memory types the model has (hugetlb is probed on the host but not modelled).</summary>
    public static readonly string[] ModelledMemory = ["anon", "shmem"];

    /// <summary>The probed host's `uname -r`, or the built-in profile's name (not compared).</summary>
    public string Source { get; init; } = "";
    /// <summary>UFFDIO_API's features with none requested (UFFD_API_FEATURES), C's %#llx.</summary>
    public string UffdApiFeatures { get; init; } = "0";
    /// <summary>The PAGEMAP_SCAN ioctl exists.</summary>
    public bool PagemapScan { get; init; }
    /// <summary>"MEMORY.MODE" → kuffd's register line: "ok ioctls=…" or the errno name (an mmap failure: "mmap ERRNO").</summary>
    public SortedDictionary<string, string> RegisterIoctls { get; init; } = new(StringComparer.Ordinal);
    /// <summary>CONFIG_MEM_SOFT_DIRTY (a new VMA carries VM_SOFTDIRTY: "sd" in smaps' VmFlags).</summary>
    public bool SoftDirty { get; init; }
    /// <summary>CONFIG_MEMORY_FAILURE (/proc/sys/vm/memory_failure_recovery exists).</summary>
    public bool MemoryFailure { get; init; }
    /// <summary>/sys/kernel/mm/transparent_hugepage/enabled: never, madvise or always.</summary>
    public string Thp { get; init; } = "madvise";
    /// <summary>/sys/kernel/mm/transparent_hugepage/use_zero_page.</summary>
    public bool ThpUseZeroPage { get; init; } = true;
    /// <summary>A read fault on empty private anon memory maps the zero page (/proc/kpageflags KPF_ZERO).</summary>
    public bool ReadFaultZeroPage { get; init; } = true;
    /// <summary>A swap device is active (/proc/swaps lists one).</summary>
    public bool Swap { get; init; }

    private static readonly JsonSerializerOptions s_json = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        WriteIndented = true,
        DefaultIgnoreCondition = JsonIgnoreCondition.Never,
    };

    public string ToJson() => JsonSerializer.Serialize(this, s_json) + "\n";

    public static HostProfile FromJson(string json) =>
        JsonSerializer.Deserialize<HostProfile>(json, s_json) ?? throw new JsonException("empty profile");

    /// <summary>kuffd's register line for an outcome.</summary>
    public static string RegisterLine(Errno e, ulong ioctls) =>
        e == Errno.OK ? "ok ioctls=" + ScenarioParsing.FormatIoctls(ioctls) : e.Name();

    private static readonly string[] s_thpNames = ["never", "madvise", "always"];

    /// <summary>
    /// The profile a built-in kernel profile and machine settings give: the probe's steps run
    /// on a fresh model (UFFDIO_API with no features on a new uffd; for each memory type and
    /// mode a new one-page mapping registered on a uffd that enabled every feature).
    /// </summary>
    public static HostProfile FromModel(KernelProfile profile, MachineConfig? config = null)
    {
        var k = new Mm.Kernel(profile);
        if (config is not null)
            k.Configure(_ => config);
        var mm = k.CreateMm();
        Check(k.Userfaultfd(mm, Uapi.OCloexec | Uapi.ONonblock, out var probe));
        Check(probe!.Api(Uapi.UffdApi, 0, out var features, out _));
        var regs = new SortedDictionary<string, string>(StringComparer.Ordinal);
        var addr = 0x7e00_0000_0000UL;
        foreach (var mem in ModelledMemory)
        {
            foreach (var (name, mode) in RegisterModes)
            {
                Check(k.Userfaultfd(mm, Uapi.OCloexec | Uapi.ONonblock, out var ctx));
                Check(ctx!.Api(Uapi.UffdApi, features, out _, out _));
                var file = mem == "shmem" ? k.CreateFile("probe", shmem: true, Mm.Kernel.PageSize) : null;
                var e = mm.Mmap(addr, Mm.Kernel.PageSize, Prot.Read | Prot.Write, shared: file is not null, file, 0);
                if (e != Errno.OK)
                {
                    regs[mem + "." + name] = "mmap " + e.Name();
                    continue;
                }
                e = ctx.Register(addr, Mm.Kernel.PageSize, mode, out var ioctls);
                regs[mem + "." + name] = RegisterLine(e, ioctls);
                ctx.Release();
                addr += 4UL << 20;
            }
        }
        var c = k.Config;
        return new HostProfile
        {
            Source = "model " + ProfileName(profile),
            UffdApiFeatures = ScenarioParsing.AltHex(features),
            PagemapScan = k.HasPagemapScan,
            RegisterIoctls = regs,
            SoftDirty = c.SoftDirty,
            MemoryFailure = c.MemoryFailure,
            Thp = s_thpNames[(int)c.Thp],
            ThpUseZeroPage = c.ThpUseZeroPage,
            ReadFaultZeroPage = c.ReadFaultZeroPage,
            Swap = c.Swap,
        };
    }

    private static void Check(Errno e)
    {
        if (e != Errno.OK)
            throw new InvalidOperationException("the model refused a probe step: " + e.Name());
    }

    public static string ProfileName(KernelProfile p) => p switch
    {
        KernelProfile.V6_18 => "6.18",
        KernelProfile.V6_1 => "6.1",
        _ => "5.7",
    };

    /// <summary>One field that differs; <see cref="Machine"/> marks a machine knob (THP, zero page, swap) rather than the kernel's interface or config.</summary>
    public sealed record Difference(string Field, string Host, string Model, bool Machine);

    /// <summary>
    /// Field-by-field comparison with <paramref name="model"/>. Register lines of memory types
    /// the model does not have (hugetlb) are not compared; <see cref="NotModelled"/> lists them.
    /// </summary>
    public IReadOnlyList<Difference> Compare(HostProfile model)
    {
        var d = new List<Difference>();
        void Add(string field, object a, object b, bool machine)
        {
            var sa = Convert.ToString(a, CultureInfo.InvariantCulture)!.ToLowerInvariant();
            var sb = Convert.ToString(b, CultureInfo.InvariantCulture)!.ToLowerInvariant();
            if (sa != sb)
                d.Add(new Difference(field, sa, sb, machine));
        }
        Add("uffd_api_features", UffdApiFeatures, model.UffdApiFeatures, false);
        Add("pagemap_scan", PagemapScan, model.PagemapScan, false);
        foreach (var key in RegisterIoctls.Keys.Union(model.RegisterIoctls.Keys).Where(IsModelled).Order(StringComparer.Ordinal))
            Add("register_ioctls." + key, RegisterIoctls.GetValueOrDefault(key, "(none)"), model.RegisterIoctls.GetValueOrDefault(key, "(none)"), false);
        Add("soft_dirty", SoftDirty, model.SoftDirty, false);
        Add("memory_failure", MemoryFailure, model.MemoryFailure, false);
        Add("thp", Thp, model.Thp, true);
        Add("thp_use_zero_page", ThpUseZeroPage, model.ThpUseZeroPage, true);
        Add("read_fault_zero_page", ReadFaultZeroPage, model.ReadFaultZeroPage, true);
        Add("swap", Swap, model.Swap, true);
        return d;
    }

    /// <summary>Register lines probed on a memory type the model does not have.</summary>
    [JsonIgnore]
    public IEnumerable<string> NotModelled => RegisterIoctls.Keys.Where(k => !IsModelled(k));

    private static bool IsModelled(string key) => ModelledMemory.Any(m => key.StartsWith(m + ".", StringComparison.Ordinal));

    /// <summary>
    /// The model for this profile: the built-in kernel profile whose interface (features,
    /// PAGEMAP_SCAN, register ioctls, and its built-in config) is this one, with this profile's
    /// machine settings. Null, with the differences in <paramref name="error"/>, when no
    /// built-in profile has this interface.
    /// </summary>
    public Mm.Kernel? ToKernel(out string? error)
    {
        var config = new MachineConfig
        {
            SoftDirty = SoftDirty,
            MemoryFailure = MemoryFailure,
            Thp = Array.IndexOf(s_thpNames, Thp) is var t and >= 0 ? (ThpMode)t : ThpMode.Madvise,
            ThpUseZeroPage = ThpUseZeroPage,
            ReadFaultZeroPage = ReadFaultZeroPage,
            Swap = Swap,
        };
        var reasons = new List<string>();
        foreach (var p in new[] { KernelProfile.V6_18, KernelProfile.V6_1, KernelProfile.V5_7 })
        {
            var diffs = Compare(FromModel(p, Mm.Kernel.ConfigIsBuiltIn(p) ? Mm.Kernel.DefaultConfig(p) with { Thp = config.Thp } : config)).Where(x => !x.Machine).ToList();
            if (diffs.Count == 0)
            {
                error = null;
                var k = new Mm.Kernel(p);
                k.Configure(_ => config);
                return k;
            }
            reasons.Add($"{ProfileName(p)}: " + string.Join(", ", diffs.Select(x => $"{x.Field} is {x.Host}, the profile's {x.Model}")));
        }
        error = "no built-in profile has this kernel interface (" + string.Join("; ", reasons) + ")";
        return null;
    }
}
