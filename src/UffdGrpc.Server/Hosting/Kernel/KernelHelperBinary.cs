using System.Runtime.InteropServices;

namespace UffdGrpc.Server.Hosting.Kernel;

/// <summary>
/// The helper program of the kernel backend (uffd-helper.c, embedded in this assembly):
/// compiled once with gcc into a cache folder keyed by the source's hash, as the kuffd
/// harness is, or a prebuilt binary named by <see cref="BinaryVariable"/> or by
/// KernelBackend:HelperPath.
/// </summary>
internal static class KernelHelperBinary
{
    /// <summary>The environment variable naming a prebuilt helper binary.</summary>
    public const string BinaryVariable = "UFFDGRPC_KERNEL_HELPER";

    private const string Resource = "uffd-helper.c";
    private static readonly UffdGrpc.Shared.EmbeddedCProgram s_program = new(typeof(KernelHelperBinary).Assembly, Resource, "uffd-helper");

    private static string? Prebuilt(string? configured) =>
        configured is { Length: > 0 } ? configured : Environment.GetEnvironmentVariable(BinaryVariable) is { Length: > 0 } env ? env : null;

    /// <summary>Why this host cannot run kernel-backed address spaces, or null when it can.</summary>
    public static string? Unavailable(string? configured)
    {
        if (!OperatingSystem.IsLinux() || RuntimeInformation.ProcessArchitecture != Architecture.X64)
            return "the host is not Linux x86-64";
        if (UffdGrpc.Shared.HostUserfaultfd.WhyNotAllowed() is { } why)
            return why;
        if (Prebuilt(configured) is { } bin)
            return File.Exists(bin) ? null : $"the helper binary {bin} does not exist";
        if (!s_program.Embedded)
            return $"this build has no {Resource} embedded; set KernelBackend:HelperPath or {BinaryVariable} to a helper binary";
        return UffdGrpc.Shared.HostUserfaultfd.FindOnPath("gcc") is null ? "gcc not found on PATH (needed once to build the helper; or set KernelBackend:HelperPath)" : null;
    }

    /// <summary>The helper binary: a prebuilt one, or the embedded source compiled once.</summary>
    public static async Task<string> PathAsync(string? configured, CancellationToken ct) =>
        Prebuilt(configured) ?? await s_program.BinaryAsync(ct).ConfigureAwait(false);
}
