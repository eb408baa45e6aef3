using UffdGrpc.Mm;
using static UffdGrpc.Scenarios.ScenarioParsing;

namespace UffdGrpc.Scenarios;

/// <summary>The userfaultfd commands of the scenario language.</summary>
public sealed partial class ScenarioInterpreter
{
    private static bool ParseFeatures(string[] argv, int from, out ulong f)
    {
        f = 0;
        for (var i = from; i < argv.Length; i++)
        {
            var w = argv[i];
            if (w is "dev" or "usermode" or "blocking")
                continue;
            if (FeatureNames.TryGetValue(w, out var bit))
                f |= bit;
            else if (w.StartsWith("bit", StringComparison.Ordinal))
                f |= 1UL << (Atoi(w[3..]) & 63);
            else if (w.StartsWith("0x", StringComparison.Ordinal))
                f |= Num(w);
            else
                return false;
        }
        return true;
    }

    private async Task DoApiAsync(int id, ulong feats, ulong api, bool label)
    {
        var (e, features, ioctls) = await _k.UffdApiAsync(_uffds[id].Handle, api, feats).ConfigureAwait(false);
        if (e == Errno.OK)
        {
            _uffds[id].ApiDone = true;
            _uffds[id].Features = feats;
        }
        Emit(label
            ? $"{e.Name()} u{id} features={AltHex(features)} ioctls={FormatIoctls(ioctls)}"
            : $"{e.Name()} features={AltHex(features)} ioctls={FormatIoctls(ioctls)}");
    }

    private async Task CmdUffdAsync(string[] argv)
    {
        if (argv.Length < 2)
        {
            Emit("USAGE uffd open|create|api|close|use|events|poll ...");
            return;
        }
        var sub = argv[1];
        switch (sub)
        {
            case "open" or "create":
                {
                    if (!ParseFeatures(argv, 2, out var f))
                    {
                        Emit("USAGE unknown feature");
                        return;
                    }
                    var blocking = HasWord(argv, 2, "blocking");
                    var flags = Uapi.OCloexec | (blocking ? 0 : Uapi.ONonblock) | (HasWord(argv, 2, "usermode") ? Uapi.UffdUserModeOnly : 0);
                    var (e, h) = await _k.UffdCreateAsync(_mainProc, flags).ConfigureAwait(false);
                    if (e != Errno.OK)
                    {
                        Emit(e.Name());
                        return;
                    }
                    var id = _uffds.Count;
                    _uffds.Add(new UffdEnt { Handle = h, Open = true, Blocking = blocking });
                    _cur = id;
                    if (sub == "create")
                        Emit($"ok u{id}");
                    else
                        await DoApiAsync(id, f, Uapi.UffdApi, label: true).ConfigureAwait(false);
                    return;
                }
            case "api":
                {
                    ulong api = Uapi.UffdApi;
                    var from = 2;
                    if (argv.Length > 2 && argv[2].StartsWith("api=", StringComparison.Ordinal))
                    {
                        api = Num(argv[2][4..]);
                        from = 3;
                    }
                    if (!ParseFeatures(argv, from, out var f))
                    {
                        Emit("USAGE unknown feature");
                        return;
                    }
                    if (CurHandle() < 0)
                    {
                        Emit("USAGE no uffd");
                        return;
                    }
                    await DoApiAsync(_cur, f, api, label: false).ConfigureAwait(false);
                    return;
                }
            case "use":
                {
                    var id = argv.Length > 2 ? Atoi(argv[2][(argv[2][0] == 'u' ? 1 : 0)..]) : -1;
                    if (id < 0 || id >= _uffds.Count)
                    {
                        Emit("USAGE uffd use uN");
                        return;
                    }
                    _cur = id;
                    Emit("ok");
                    return;
                }
            case "close":
                {
                    var id = argv.Length > 2 ? Atoi(argv[2][(argv[2][0] == 'u' ? 1 : 0)..]) : _cur;
                    if (id < 0 || id >= _uffds.Count || _uffds[id].Handle < 0)
                    {
                        Emit("USAGE no such uffd");
                        return;
                    }
                    _uffds[id].Open = false;
                    await _k.CloseAsync(_uffds[id].Handle).ConfigureAwait(false);
                    _uffds[id].Handle = -1;
                    Emit("ok");
                    return;
                }
            case "poll":
                {
                    if (CurHandle() < 0)
                    {
                        Emit("USAGE no uffd");
                        return;
                    }
                    var (pin, perr) = await _k.PollAsync(CurHandle()).ConfigureAwait(false);
                    var ev = new List<string>();
                    if (pin)
                        ev.Add("POLLIN");
                    if (perr)
                        ev.Add("POLLERR");
                    Emit("poll: " + (ev.Count == 0 ? "none" : string.Join('|', ev)));
                    return;
                }
            case "events":
                {
                    if (CurHandle() < 0)
                    {
                        Emit("USAGE no uffd");
                        return;
                    }
                    var n = 0;
                    while (true)
                    {
                        var (e, m) = await _k.ReadAsync(CurHandle()).ConfigureAwait(false);
                        if (m is null)
                        {
                            if (e == Errno.EAGAIN && _uffds[_cur].Blocking)
                                throw new ScenarioTimeoutException();
                            if (e != Errno.EAGAIN)
                                Emit("read: " + e.Name());
                            break;
                        }
                        n++;
                        await HandleMsgAsync(_cur, m, resolve: false, Emit).ConfigureAwait(false);
                    }
                    Emit($"messages={n}");
                    return;
                }
            default:
                Emit("USAGE unknown uffd subcommand");
                return;
        }
    }

    private static bool ParseRegModes(string[] argv, int from, out ulong mode)
    {
        mode = 0;
        for (var i = from; i < argv.Length; i++)
        {
            var w = argv[i];
            if (w == "missing")
                mode |= Uapi.RegisterModeMissing;
            else if (w == "wp")
                mode |= Uapi.RegisterModeWp;
            else if (w == "minor")
                mode |= Uapi.RegisterModeMinor;
            else if (w == "none")
                continue;
            else if (w.StartsWith("mode=", StringComparison.Ordinal))
                mode |= Num(w[5..]);
            else
                return false;
        }
        return true;
    }

    private async Task CmdRegisterAsync(string[] argv)
    {
        if (!GetRange(argv, 1, out var s, out var l) || !ParseRegModes(argv, 4, out var mode))
        {
            Emit("USAGE register NAME FIRST COUNT missing|wp|minor...");
            return;
        }
        if (CurHandle() < 0)
        {
            Emit("USAGE no uffd");
            return;
        }
        var (e, io) = await _k.RegisterAsync(CurHandle(), s, l, mode).ConfigureAwait(false);
        Emit(e != Errno.OK ? e.Name() : "ok ioctls=" + FormatIoctls(io));
    }

    private async Task CmdUnregisterAsync(string[] argv)
    {
        if (!GetRange(argv, 1, out var s, out var l))
        {
            Emit("USAGE unregister NAME FIRST COUNT");
            return;
        }
        if (CurHandle() < 0)
        {
            Emit("USAGE no uffd");
            return;
        }
        Emit((await _k.UnregisterAsync(CurHandle(), s, l).ConfigureAwait(false)).Name());
    }

    /// <summary>The range ioctls (main, or the worker through async). Null when not an ioctl command.</summary>
    private async Task<List<string>?> RunIoctlAsync(string[] argv, int proc)
    {
        switch (argv[0])
        {
            case "wp" or "unwp":
                {
                    if (!GetRange(argv, 1, out var s, out var l))
                        return ["USAGE wp|unwp NAME FIRST COUNT [dontwake]"];
                    if (CurHandle() < 0)
                        return ["USAGE no uffd"];
                    ulong mode = argv[0] == "wp" ? Uapi.WriteprotectModeWp : 0;
                    if (HasWord(argv, 4, "dontwake"))
                        mode |= Uapi.WriteprotectModeDontwake;
                    mode = ModeOverride(argv, 4, mode);
                    return [(await _k.WriteprotectAsync(CurHandle(), s, l, mode).ConfigureAwait(false)).Name()];
                }
            case "copy":
                {
                    if (!GetRange(argv, 1, out var s, out var l) || argv.Length < 5 || !ParseByte(argv[4], out var b))
                        return ["USAGE copy NAME FIRST COUNT BYTE [wp] [dontwake] [srcoff=N]"];
                    if (CurHandle() < 0)
                        return ["USAGE no uffd"];
                    ulong mode = 0, srcoff = 0;
                    if (HasWord(argv, 5, "wp"))
                        mode |= Uapi.CopyModeWp;
                    if (HasWord(argv, 5, "dontwake"))
                        mode |= Uapi.CopyModeDontwake;
                    for (var i = 5; i < argv.Length; i++)
                    {
                        if (argv[i].StartsWith("mode=", StringComparison.Ordinal))
                            mode = Num(argv[i][5..]);
                        if (argv[i].StartsWith("srcoff=", StringComparison.Ordinal))
                            srcoff = Num(argv[i][7..]);
                    }
                    if (unchecked(l + srcoff + Pg) > (64UL << 20) || l > (64UL << 20) || srcoff > (64UL << 20))
                        return ["USAGE copy too large"];
                    var r = await _k.CopyAsync(CurHandle(), s, SrcBufAddr + srcoff, b, l, mode).ConfigureAwait(false);
                    return [$"{r.Errno.Name()} copy={FormatFill(r.Field)}"];
                }
            case "zeropage":
                {
                    if (!GetRange(argv, 1, out var s, out var l))
                        return ["USAGE zeropage NAME FIRST COUNT [dontwake]"];
                    if (CurHandle() < 0)
                        return ["USAGE no uffd"];
                    var mode = ModeOverride(argv, 4, HasWord(argv, 4, "dontwake") ? Uapi.ZeropageModeDontwake : 0);
                    var r = await _k.ZeropageAsync(CurHandle(), s, l, mode).ConfigureAwait(false);
                    return [$"{r.Errno.Name()} zeropage={FormatFill(r.Field)}"];
                }
            case "continue":
                {
                    if (!GetRange(argv, 1, out var s, out var l))
                        return ["USAGE continue NAME FIRST COUNT [wp] [dontwake]"];
                    if (CurHandle() < 0)
                        return ["USAGE no uffd"];
                    ulong mode = 0;
                    if (HasWord(argv, 4, "wp"))
                        mode |= Uapi.ContinueModeWp;
                    if (HasWord(argv, 4, "dontwake"))
                        mode |= Uapi.ContinueModeDontwake;
                    var r = await _k.ContinueAsync(CurHandle(), s, l, mode).ConfigureAwait(false);
                    return [$"{r.Errno.Name()} mapped={FormatFill(r.Field)}"];
                }
            case "poison":
                {
                    if (!GetRange(argv, 1, out var s, out var l))
                        return ["USAGE poison NAME FIRST COUNT [dontwake]"];
                    if (CurHandle() < 0)
                        return ["USAGE no uffd"];
                    var r = await _k.PoisonAsync(CurHandle(), s, l, HasWord(argv, 4, "dontwake") ? Uapi.PoisonModeDontwake : 0).ConfigureAwait(false);
                    return [$"{r.Errno.Name()} updated={FormatFill(r.Field)}"];
                }
            case "move":
                {
                    if (argv.Length < 6 || !ParseLoc(argv[1], argv[2], out var d, out _) || !ParseLoc(argv[3], argv[4], out var s, out _)
                        || !ParsePages(argv[5], out var l))
                        return ["USAGE move DST DFIRST SRC SFIRST COUNT [holes] [dontwake]"];
                    if (CurHandle() < 0)
                        return ["USAGE no uffd"];
                    ulong mode = 0;
                    if (HasWord(argv, 6, "holes"))
                        mode |= Uapi.MoveModeAllowSrcHoles;
                    if (HasWord(argv, 6, "dontwake"))
                        mode |= Uapi.MoveModeDontwake;
                    var r = await _k.MoveAsync(CurHandle(), proc, d, s, l, mode).ConfigureAwait(false);
                    return [$"{r.Errno.Name()} move={FormatFill(r.Field)}"];
                }
            case "wake":
                {
                    if (!GetRange(argv, 1, out var s, out var l))
                        return ["USAGE wake NAME FIRST COUNT"];
                    if (CurHandle() < 0)
                        return ["USAGE no uffd"];
                    return [(await _k.WakeAsync(CurHandle(), s, l).ConfigureAwait(false)).Name()];
                }
            default:
                return null;
        }
    }

    private static ulong ModeOverride(string[] argv, int from, ulong mode)
    {
        for (var i = from; i < argv.Length; i++)
        {
            if (argv[i].StartsWith("mode=", StringComparison.Ordinal))
                mode = Num(argv[i][5..]);
        }
        return mode;
    }
}
