using UffdGrpc.Mm;
using static UffdGrpc.Scenarios.ScenarioParsing;

namespace UffdGrpc.Scenarios;

/// <summary>The commands of the scenario language (kuffd.c cmd_*).</summary>
public sealed partial class ScenarioInterpreter
{
    private static readonly Dictionary<string, Madv> s_madvNames = new()
    {
        ["dontneed"] = Madv.Dontneed,
        ["pageout"] = Madv.Pageout,
        ["free"] = Madv.Free,
        ["remove"] = Madv.Remove,
        ["hugepage"] = Madv.Hugepage,
        ["nohugepage"] = Madv.Nohugepage,
        ["populate_read"] = Madv.PopulateRead,
        ["populate_write"] = Madv.PopulateWrite,
        ["collapse"] = Madv.Collapse,
        ["dontfork"] = Madv.Dontfork,
        ["dofork"] = Madv.Dofork,
        ["cold"] = Madv.Cold,
        ["wipeonfork"] = Madv.Wipeonfork,
        ["normal"] = Madv.Normal,
    };

    private static readonly string[] s_plain = ["write", "read", "kwrite", "kread", "populate", "pagemap", "pageid", "vmas", "scan"];

    private const string AccessUsage = "USAGE write NAME PAGE BYTE [COUNT] | read NAME PAGE [COUNT] | kwrite NAME PAGE BYTE | kread NAME PAGE";

    // ------------------------------------------------------------------ thread operations

    /// <summary>The thread operation an executor command starts, or null (not an operation, or malformed).</summary>
    private ThreadOpRequest? ThreadOpFor(string[] argv, Executor? ex = null)
    {
        switch (argv[0])
        {
            case "pvread" or "pvwrite":
                return ProcessVmOpFor(argv, ex, out _);
            case "write" or "read" or "kwrite" or "kread":
                {
                    if (!ParseAccess(argv, out var addr, out var b, out var cnt, out _))
                        return null;
                    var kernel = argv[0][0] == 'k';
                    return new ThreadOpRequest(ThreadOpKind.Access)
                    {
                        Addr = addr,
                        Write = argv[0] is "write" or "kwrite",
                        Value = b,
                        Count = kernel ? 1 : (int)Math.Min(cnt, int.MaxValue),
                        KernelOrigin = kernel,
                    };
                }
            case "populate":
                if (!GetRange(argv, 1, out var s, out var l) || argv.Length < 5)
                    return null;
                return new ThreadOpRequest(ThreadOpKind.Populate) { Addr = s, Len = l, Write = argv[4] == "write" };
            case "mremap" when ex is { IsChild: true } && ex.RemapAddrs.Count > 0:
                return ChildMremapOp(argv, ex.RemapAddrs.Dequeue());
            default:
                return MadviseLikeOp(argv);
        }
    }

    /// <summary>
    /// kuffd's child_mremap_send ("child: mremap OLD NEW [FIRST COUNT]"): main names NEW at its
    /// next arena slot, as its own mremap would, so that the REMAP event the child raises prints
    /// NEW, and hands the child that slot.
    /// </summary>
    private void ChildMremapSend(string[] argv)
    {
        if (argv.Length < 4)
        {
            Emit("USAGE mremap OLD NEW [FIRST COUNT]");
            return;
        }
        var o = FindMap(argv[2]);
        if (o is null || FindMap(argv[3]) is not null)
        {
            Emit("USAGE bad names");
            return;
        }
        var start = o.Base;
        var len = o.Len;
        if (argv.Length >= 6)
        {
            if (!ParsePages(argv[4], out var off) || !ParsePages(argv[5], out len))
            {
                Emit("USAGE bad range");
                return;
            }
            start = o.Base + off;
        }
        var addr = _arenaNext;
        _maps.Add(new Mapping { Name = argv[3], Base = addr, Len = len, File = o.File, Shared = o.Shared, Off = o.Off + (start - o.Base) });
        _arenaNext += ((len + PmdSize - 1) & ~(PmdSize - 1)) + PmdSize;
        _child.RemapAddrs.Enqueue(addr);
        Send(_child, string.Join(' ', argv.Skip(1)));
    }

    /// <summary>The child's side of "child: mremap" (kuffd do_mremap at the slot main chose; main validated the names).</summary>
    private ThreadOpRequest ChildMremapOp(string[] argv, ulong addr)
    {
        var o = FindMap(argv[1])!;
        var start = o.Base;
        var len = o.Len;
        if (argv.Length >= 5 && ParsePages(argv[3], out var off) && ParsePages(argv[4], out var l))
        {
            start = o.Base + off;
            len = l;
        }
        return new ThreadOpRequest(ThreadOpKind.Mremap) { Addr = start, Len = len, Addr2 = addr };
    }

    /// <summary>madvise, munmap and thp, which may wait for an event to be read.</summary>
    private ThreadOpRequest? MadviseLikeOp(string[] argv)
    {
        switch (argv[0])
        {
            case "madvise":
                if (!GetRange(argv, 1, out var s, out var l) || argv.Length < 5 || !s_madvNames.TryGetValue(argv[4], out var adv))
                    return null;
                return new ThreadOpRequest(ThreadOpKind.Madvise) { Addr = s, Len = l, Advice = adv };
            case "munmap":
                if (!GetRange(argv, 1, out s, out l))
                    return null;
                return new ThreadOpRequest(ThreadOpKind.Munmap) { Addr = s, Len = l };
            case "thp":
                if (argv.Length < 3 || FindMap(argv[1]) is not { } m)
                    return null;
                return new ThreadOpRequest(ThreadOpKind.Madvise) { Addr = m.Base, Len = m.Len, Advice = argv[2] == "on" ? Madv.Hugepage : Madv.Nohugepage };
            default:
                return null;
        }
    }

    private static string? MadviseLikeUsage(string[] argv) => argv[0] switch
    {
        "madvise" => argv.Length >= 5 && !s_madvNames.ContainsKey(argv[4]) ? "USAGE unknown advice" : "USAGE madvise NAME FIRST COUNT ADVICE",
        "munmap" => "USAGE munmap NAME FIRST COUNT",
        "thp" => "USAGE thp NAME on|off",
        _ => null,
    };

    private bool ParseAccess(string[] argv, out ulong addr, out byte b, out ulong cnt, out string what)
    {
        var op = argv[0];
        var wr = op is "write" or "kwrite";
        var ai = wr ? 4 : 3;
        addr = 0;
        b = 0;
        cnt = 1;
        what = "";
        if (argv.Length < ai || !ParseLoc(argv[1], argv[2], out addr, out _) || (wr && !ParseByte(argv[3], out b)))
            return false;
        if (argv.Length > ai)
            cnt = Num(argv[ai]);
        what = cnt > 1 ? $"{op} {argv[1]} {argv[2]}-{Inv(Num(argv[2]) + cnt - 1)}" : $"{op} {argv[1]} {argv[2]}";
        if (wr)
            what += " " + argv[3];
        return true;
    }

    /// <summary>The result lines of a finished executor operation (cmd_access, cmd_populate, prefixed madvise/munmap/thp).</summary>
    private Task<List<string>> FormatOpResultAsync(string[] argv, ThreadOpResult r)
    {
        var lines = new List<string>();
        switch (argv[0])
        {
            case "write" or "read" or "kwrite" or "kread":
                {
                    ParseAccess(argv, out var addr, out _, out _, out var what);
                    if (argv[0][0] == 'k')
                    {
                        if (argv[0] == "kread" && r.Errno == Errno.OK)
                            lines.Add($"{what} = 0x{r.Values[0]:x2}");
                        else
                            lines.Add($"{what} {r.Errno.Name()}");
                    }
                    else if (r.Signal != SigCode.None)
                    {
                        var at = r.Values.Length > 1 ? " at " + AddrName(addr + ((ulong)r.Done * Pg)) : "";
                        lines.Add($"{what} {SignalText(r.Signal)}{at}");
                    }
                    else if (argv[0] == "write")
                    {
                        lines.Add($"{what} ok");
                    }
                    else
                    {
                        lines.Add($"{what} = {FormatValues(r.Values)}");
                    }
                    break;
                }
            case "populate":
                lines.Add($"populate {argv[1]} {argv[2]} {argv[3]} {argv[4]} {r.Errno.Name()}");
                break;
            case "pvread" or "pvwrite":
                lines.Add($"{string.Join(' ', argv)}: {FormatProcessVm(r)}");
                break;
            default:
                lines.Add($"{string.Join(' ', argv)}: {r.Errno.Name()}");
                break;
        }
        return Task.FromResult(lines);
    }

    /// <summary>An executor command that is not a thread operation (or a malformed one).</summary>
    private async Task<List<string>> RunOnExecutorAsync(string[] argv, Executor ex)
    {
        var op = argv[0];
        var isPlain = Array.IndexOf(s_plain, op) >= 0;
        var prefix = isPlain ? "" : string.Join(' ', argv) + ": ";
        List<string>? lines;
        if (op is "write" or "read" or "kwrite" or "kread")
            lines = [AccessUsage];
        else if (op == "populate")
            lines = ["USAGE populate NAME FIRST COUNT read|write"];
        else if (op is "pvread" or "pvwrite")
            lines = ProcessVmOpFor(argv, ex, out var pvmUsage) is null ? [pvmUsage] : null;
        else if (MadviseLikeUsage(argv) is { } u)
            lines = [u];
        else
            lines = await RunCommonAsync(argv, ex, ex.Process).ConfigureAwait(false);
        if (lines is null && !ex.IsChild)
            lines = await RunIoctlAsync(argv, ex.Process).ConfigureAwait(false);
        lines ??= ["USAGE unknown command on executor: " + op];
        return lines.Select(l => prefix + l).ToList();
    }

    /// <summary>
    /// Commands valid on main and every executor (run_local), plus on main the uffd ioctls.
    /// Returns null for an unknown command.
    /// </summary>
    private async Task<List<string>?> RunCommonAsync(string[] argv, Executor? ex, int proc)
    {
        switch (argv[0])
        {
            case "mprotect":
                {
                    if (!GetRange(argv, 1, out var s, out var l) || argv.Length < 5 || !ParseProt(argv[4], out var prot))
                        return ["USAGE mprotect NAME FIRST COUNT PROT"];
                    return [(await _k.MprotectAsync(proc, s, l, prot).ConfigureAwait(false)).Name()];
                }
            case "madvise" or "munmap" or "thp":
                {
                    if (MadviseLikeOp(argv) is not { } req)
                        return [MadviseLikeUsage(argv)!];
                    var r = await RunOnMainAsync(req).ConfigureAwait(false);
                    return [r.Errno.Name()];
                }
            case "clear_refs":
                return [(await _k.ClearRefsAsync(proc, argv.Length > 1 ? argv[1] : "4").ConfigureAwait(false)).Name()];
            case "pagemap":
                return await CmdPagemapAsync(argv, proc).ConfigureAwait(false);
            case "pageid":
                return await CmdPageidAsync(argv, proc).ConfigureAwait(false);
            case "vmas":
                return await CmdVmasAsync(argv, proc).ConfigureAwait(false);
            case "scan" or "pagemap_scan":
                return await CmdScanAsync(argv, proc).ConfigureAwait(false);
            case "sleep":
                return ["ok"];
            default:
                return ex is null ? await RunIoctlAsync(argv, proc).ConfigureAwait(false) : null;
        }
    }

    // ------------------------------------------------------------------ mappings

    private async Task CmdMapAsync(string[] argv)
    {
        _mapped = true;
        if (argv.Length < 3)
        {
            Emit("USAGE map NAME PAGES [anon|shmem|file] [private|shared] [PROT] [populate]");
            return;
        }
        if (FindMap(argv[1]) is not null)
        {
            Emit("USAGE duplicate name");
            return;
        }
        if (!ParsePages(argv[2], out var len) || len == 0)
        {
            Emit("USAGE bad size");
            return;
        }
        var kind = "anon";
        bool shared = false, sharedSet = false, populate = false, rofd = false;
        var prot = Prot.Read | Prot.Write;
        for (var i = 3; i < argv.Length; i++)
        {
            var w = argv[i];
            if (w is "anon" or "shmem" or "file")
            {
                kind = w;
            }
            else if (w == "private")
            {
                shared = false;
                sharedSet = true;
            }
            else if (w == "shared")
            {
                shared = true;
                sharedSet = true;
            }
            else if (w == "populate")
            {
                populate = true;
            }
            else if (w == "rofd")
            {
                rofd = true;
            }
            else if (!ParseProt(w, out prot))
            {
                Emit("USAGE bad map option");
                return;
            }
        }
        if (!sharedSet)
            shared = kind != "anon";
        var file = 0;
        if (kind != "anon")
            file = await _k.CreateFileAsync(argv[1], kind == "shmem", (len + Pg - 1) & ~(Pg - 1)).ConfigureAwait(false);
        var addr = _arenaNext;
        var e = await _k.MmapAsync(_mainProc, addr, len, prot, shared, file, 0, rofd && file != 0, populate).ConfigureAwait(false);
        if (e != Errno.OK)
        {
            Emit(e.Name());
            return;
        }
        _maps.Add(new Mapping { Name = argv[1], Base = addr, Len = len, File = file, Shared = shared });
        _arenaNext += ((len + PmdSize - 1) & ~(PmdSize - 1)) + PmdSize;
        Emit("ok");
    }

    private async Task CmdAliasAsync(string[] argv)
    {
        if (argv.Length < 3)
        {
            Emit("USAGE alias NEW OLD [private|shared] [PROT]");
            return;
        }
        var o = FindMap(argv[2]);
        if (o is null || o.File == 0 || FindMap(argv[1]) is not null)
        {
            Emit("USAGE alias needs a new name and a shmem/file mapping");
            return;
        }
        var shared = o.Shared;
        var prot = Prot.Read | Prot.Write;
        for (var i = 3; i < argv.Length; i++)
        {
            if (argv[i] == "private")
            {
                shared = false;
            }
            else if (argv[i] == "shared")
            {
                shared = true;
            }
            else if (!ParseProt(argv[i], out prot))
            {
                Emit("USAGE bad alias option");
                return;
            }
        }
        var addr = _arenaNext;
        var e = await _k.MmapAsync(_mainProc, addr, o.Len, prot, shared, o.File, o.Off, false, false).ConfigureAwait(false);
        if (e != Errno.OK)
        {
            Emit(e.Name());
            return;
        }
        _maps.Add(new Mapping { Name = argv[1], Base = addr, Len = o.Len, File = o.File, Shared = shared, Off = o.Off });
        _arenaNext += ((o.Len + PmdSize - 1) & ~(PmdSize - 1)) + PmdSize;
        Emit("ok");
    }

    private async Task CmdMremapAsync(string[] argv)
    {
        if (argv.Length < 3)
        {
            Emit("USAGE mremap OLD NEW [FIRST COUNT]");
            return;
        }
        var o = FindMap(argv[1]);
        if (o is null || FindMap(argv[2]) is not null)
        {
            Emit("USAGE bad names");
            return;
        }
        var start = o.Base;
        var len = o.Len;
        if (argv.Length >= 5)
        {
            if (!ParsePages(argv[3], out var off) || !ParsePages(argv[4], out len))
            {
                Emit("USAGE bad range");
                return;
            }
            start = o.Base + off;
        }
        var addr = _arenaNext;
        var m = new Mapping { Name = argv[2], Base = addr, Len = len, File = o.File, Shared = o.Shared, Off = o.Off + (start - o.Base) };
        _maps.Add(m);
        var r = await RunOnMainAsync(new ThreadOpRequest(ThreadOpKind.Mremap) { Addr = start, Len = len, Addr2 = addr }).ConfigureAwait(false);
        if (r.Errno != Errno.OK)
        {
            _maps.Remove(m);
            Emit(r.Errno.Name());
            return;
        }
        _arenaNext += ((len + PmdSize - 1) & ~(PmdSize - 1)) + PmdSize;
        Emit("ok");
    }

    // ------------------------------------------------------------------ processes

    private async Task CmdForkAsync()
    {
        if (_child.Alive)
        {
            Emit("USAGE a child is already running");
            return;
        }
        var r = await RunOnMainAsync(new ThreadOpRequest(ThreadOpKind.Fork)).ConfigureAwait(false);
        var tid = await _k.ThreadTidAsync(r.ChildThread).ConfigureAwait(false);
        _child = new Executor("child") { Alive = true, IsChild = true, Process = r.ChildProcess, Thread = r.ChildThread, Tid = tid };
        Emit("ok");
    }

    /// <summary>child_reap: SIGKILL a running child, or report the exit it made.</summary>
    private async Task ReapChildAsync(bool kill)
    {
        if (_child.Process == 0)
            return;
        if (kill && _child.Alive)
            await _k.EndProcessAsync(_child.Process, kill: true).ConfigureAwait(false);
        Emit(kill ? "child killed by signal 9" : "child exited status=0");
        _child = new Executor("child");
    }

    private async Task CmdPokeAsync(string[] argv)
    {
        if (argv.Length < 4 || !ParseLoc(argv[1], argv[2], out var a, out _) || !ParseByte(argv[3], out var b))
        {
            Emit("USAGE poke NAME PAGE BYTE");
            return;
        }
        var r = await RunOnMainAsync(new ThreadOpRequest(ThreadOpKind.Access) { Addr = a, Write = true, Value = b }).ConfigureAwait(false);
        Emit(r.Signal != SigCode.None ? SignalText(r.Signal) : "ok");
    }

    private void CmdHandler(string[] argv)
    {
        var p = Policy.None;
        byte b = 0;
        for (var i = 1; i < argv.Length; i++)
        {
            var w = argv[i];
            switch (w)
            {
                case "none" or "log":
                    break;
                case "off":
                    p |= Policy.Off;
                    break;
                case "unwp":
                    p |= Policy.Unwp;
                    break;
                case "zeropage":
                    p |= Policy.Zero;
                    break;
                case "continue":
                    p |= Policy.Cont;
                    break;
                case "continuewp":
                    p |= Policy.ContWp;
                    break;
                case "wake":
                    p |= Policy.Wake;
                    break;
                case "record" or "auto":
                    p |= Policy.Unwp | Policy.Zero | Policy.Cont;
                    break;
                default:
                    if (w is "copy" or "copywp" && i + 1 < argv.Length && ParseByte(argv[i + 1], out b))
                    {
                        p |= w == "copy" ? Policy.Copy : Policy.CopyWp;
                        i++;
                        break;
                    }
                    Emit("USAGE handler off|none|unwp|copy BYTE|copywp BYTE|zeropage|continue|continuewp|wake|auto");
                    return;
            }
        }
        _policy = p;
        _policyByte = b;
        Emit("ok");
    }

    private async Task<bool> CmdRequireAsync(string[] argv)
    {
        for (var i = 1; i < argv.Length; i++)
        {
            var w = argv[i];
            var neg = w.StartsWith('!');
            if (neg)
                w = w[1..];
            bool ok;
            switch (w)
            {
                case "swap":
                    if (!_mapped)
                        await _k.ConfigureAsync(swap: !neg, softDirty: null).ConfigureAwait(false);
                    ok = await _k.AvailableAsync("swap", 0).ConfigureAwait(false);
                    break;
                case "softdirty":
                    if (!_mapped)
                        await _k.ConfigureAsync(swap: null, softDirty: !neg).ConfigureAwait(false);
                    ok = await _k.AvailableAsync("softdirty", 0).ConfigureAwait(false);
                    break;
                case "thp" or "pagemap_scan":
                    ok = await _k.AvailableAsync(w, 0).ConfigureAwait(false);
                    break;
                default:
                    if (!FeatureNames.TryGetValue(w, out var bit))
                    {
                        Emit("USAGE require swap|thp|softdirty|pagemap_scan|FEATURE");
                        return true;
                    }
                    ok = await _k.AvailableAsync("feature", bit).ConfigureAwait(false);
                    break;
            }
            if (ok == neg)
            {
                Emit("SKIP requirement not met: " + argv[i]);
                return false;
            }
        }
        Emit("ok");
        return true;
    }

    // ------------------------------------------------------------------ introspection

    private async Task<List<string>> CmdPagemapAsync(string[] argv, int proc)
    {
        if (!GetRange(argv, 1, out var s, out var l) || FindMap(argv[1]) is not { } m)
            return ["USAGE pagemap NAME FIRST COUNT"];
        var np = (int)(l / Pg);
        var v = await _k.PagemapAsync(proc, s, np).ConfigureAwait(false);
        var f = new string[np];
        for (var i = 0; i < np; i++)
            f[i] = await FormatPagemapAsync(v[i]).ConfigureAwait(false);
        var lines = new List<string>();
        var first = (s - m.Base) / Pg;
        for (var i = 0; i < np;)
        {
            var j = i + 1;
            while (j < np && f[j] == f[i])
                j++;
            var p0 = first + (ulong)i;
            var p1 = first + (ulong)j - 1;
            lines.Add(p0 == p1 ? $"pagemap {m.Name} {p0}: {f[i]}" : $"pagemap {m.Name} {p0}-{p1}: {f[i]}");
            i = j;
        }
        return lines;
    }

    private async Task<string> FormatPagemapAsync(ulong e)
    {
        var w = new List<string>();
        if ((e & Uapi.PmPresent) != 0)
            w.Add("present");
        if ((e & Uapi.PmSwap) != 0)
            w.Add("swapped");
        if ((e & Uapi.PmFile) != 0)
            w.Add("file");
        if ((e & Uapi.PmMmapExclusive) != 0)
            w.Add("exclusive");
        if ((e & Uapi.PmUffdWp) != 0)
            w.Add("uffd-wp");
        if ((e & Uapi.PmSoftDirty) != 0)
            w.Add("soft-dirty");
        if ((e & Uapi.PmGuard) != 0)
            w.Add("guard");
        if ((e & Uapi.PmPresent) != 0 && (e & Uapi.PmPfnMask) != 0)
        {
            var kf = await _k.KpageflagsAsync(e & Uapi.PmPfnMask).ConfigureAwait(false);
            if ((kf & (1UL << Uapi.KpfZeroPage)) != 0)
                w.Add("zero");
            if ((kf & (1UL << Uapi.KpfThp)) != 0)
                w.Add("thp");
        }
        return w.Count == 0 ? "none" : string.Join(' ', w);
    }

    private async Task<List<string>> CmdPageidAsync(string[] argv, int proc)
    {
        if (argv.Length < 3 || !ParseLoc(argv[1], argv[2], out var a, out _))
            return ["USAGE pageid NAME PAGE"];
        var v = (await _k.PagemapAsync(proc, a & ~(Pg - 1), 1).ConfigureAwait(false))[0];
        if ((v & Uapi.PmPresent) == 0)
            return [$"pageid {argv[1]} {argv[2]}: not-present"];
        return [$"pageid {argv[1]} {argv[2]}: #{PfnLabel(v & Uapi.PmPfnMask)}"];
    }

    private async Task<List<string>> CmdVmasAsync(string[] argv, int proc)
    {
        if (argv.Length < 2 || FindMap(argv[1]) is not { } m)
            return ["USAGE vmas NAME"];
        var lines = new List<string>();
        foreach (var v in await _k.SmapsAsync(proc, m.Base, m.Base + m.Len).ConfigureAwait(false))
        {
            var fl = new List<string>();
            if ((v.Flags & VmFlags.UffdMissing) != 0)
                fl.Add("um");
            if ((v.Flags & VmFlags.UffdWp) != 0)
                fl.Add("uw");
            if ((v.Flags & VmFlags.UffdMinor) != 0)
                fl.Add("ui");
            if ((v.Flags & VmFlags.HugePage) != 0)
                fl.Add("hg");
            if ((v.Flags & VmFlags.NoHugePage) != 0)
                fl.Add("nh");
            var p0 = ((long)v.Start - (long)m.Base) / (long)Pg;
            var p1 = (((long)v.End - (long)m.Base) / (long)Pg) - 1;
            lines.Add($"vma {m.Name} {Inv(p0)}-{Inv(p1)} {v.Perms} flags={(fl.Count == 0 ? "-" : string.Join(',', fl))} rss={Inv(v.RssPages)} swap={Inv(v.SwapPages)} pmd_mapped={Inv(v.PmdMapped)}");
        }
        if (lines.Count == 0)
            lines.Add($"vma {m.Name}: none");
        return lines;
    }

    private async Task<List<string>> CmdScanAsync(string[] argv, int proc)
    {
        const string usage = "USAGE scan NAME FIRST COUNT [wp] [check] [mask=] [anyof=] [inv=] [ret=] [max=] [vec=]";
        if (!GetRange(argv, 1, out var s, out var l) || FindMap(argv[1]) is not { } m)
            return [usage];
        var arg = new PmScanArg { Start = s, End = s + l, ReturnMask = 0x1ff };
        ulong vecn = 64;
        for (var i = 4; i < argv.Length; i++)
        {
            var w = argv[i];
            if (w == "wp")
            {
                arg = arg with { Flags = arg.Flags | (ulong)Uapi.PmScanWpMatching };
            }
            else if (w == "check")
            {
                arg = arg with { Flags = arg.Flags | (ulong)Uapi.PmScanCheckWpasync };
            }
            else if (TryCat(w, "mask=", out var c, out var bad))
            {
                if (bad)
                    return ["USAGE cats"];
                arg = arg with { CategoryMask = c };
            }
            else if (TryCat(w, "anyof=", out c, out bad))
            {
                if (bad)
                    return ["USAGE cats"];
                arg = arg with { CategoryAnyofMask = c };
            }
            else if (TryCat(w, "inv=", out c, out bad))
            {
                if (bad)
                    return ["USAGE cats"];
                arg = arg with { CategoryInverted = c };
            }
            else if (TryCat(w, "ret=", out c, out bad))
            {
                if (bad)
                    return ["USAGE cats"];
                arg = arg with { ReturnMask = c };
            }
            else if (w.StartsWith("max=", StringComparison.Ordinal))
            {
                arg = arg with { MaxPages = Num(w[4..]) };
            }
            else if (w.StartsWith("vec=", StringComparison.Ordinal))
            {
                vecn = Num(w[4..]);
            }
            else
            {
                return ["USAGE bad scan option"];
            }
        }
        arg = arg with { VecLen = vecn };
        var r = await _k.PagemapScanAsync(proc, arg).ConfigureAwait(false);
        var lines = new List<string>
        {
            r.Errno != Errno.OK
                ? $"scan: {r.Errno.Name()} walk_end={AddrName(r.WalkEnd)}"
                : $"scan: regions={r.Regions.Count} walk_end={AddrName(r.WalkEnd)}",
        };
        foreach (var reg in r.Regions)
        {
            var p0 = ((long)reg.Start - (long)m.Base) / (long)Pg;
            var p1 = (((long)reg.End - (long)m.Base) / (long)Pg) - 1;
            lines.Add(p0 == p1
                ? $"  region {m.Name} {Inv(p0)}: {FormatCategories(reg.Categories)}"
                : $"  region {m.Name} {Inv(p0)}-{Inv(p1)}: {FormatCategories(reg.Categories)}");
        }
        return lines;
    }

    private static bool TryCat(string w, string key, out ulong v, out bool bad)
    {
        v = 0;
        bad = false;
        if (!w.StartsWith(key, StringComparison.Ordinal))
            return false;
        bad = !ParseCategories(w[key.Length..], out v);
        return true;
    }
}
