namespace UffdGrpc.Shared;

/// <summary>What this host lets a process do with userfaultfd.</summary>
internal static class HostUserfaultfd
{
    /// <summary>
    /// userfaultfd_syscall_allowed (fs/userfaultfd.c) for uffds that handle kernel-mode
    /// faults, as the scenarios and the kernel backend need: CAP_SYS_PTRACE (root), or
    /// vm.unprivileged_userfaultfd=1. /dev/userfaultfd alone is not enough: its uffds handle
    /// kernel faults only for CAP_SYS_PTRACE too. Null when allowed, else why not.
    /// </summary>
    public static string? WhyNotAllowed()
    {
        const ulong capSysPtrace = 1UL << 19;
        var capEff = ReadTrim("/proc/self/status")?.Split('\n').FirstOrDefault(l => l.StartsWith("CapEff:", StringComparison.Ordinal));
        if (capEff is not null && ulong.TryParse(capEff[7..].Trim(), System.Globalization.NumberStyles.HexNumber, null, out var caps) && (caps & capSysPtrace) != 0)
            return null;
        if (ReadTrim("/proc/sys/vm/unprivileged_userfaultfd") == "1")
            return null;
        return "no CAP_SYS_PTRACE (not root) and vm.unprivileged_userfaultfd=0: userfaultfd with kernel-mode faults is not available";
    }

    /// <summary>A host file's text, trimmed, or null when it cannot be read.</summary>
    public static string? ReadTrim(string path)
    {
        try
        {
            return File.ReadAllText(path).Trim();
        }
        catch (IOException)
        {
            return null;
        }
        catch (UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>The full path of <paramref name="exe"/> on PATH, or null.</summary>
    public static string? FindOnPath(string exe) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries)
            .Select(d => Path.Combine(d, exe)).FirstOrDefault(File.Exists);
}
