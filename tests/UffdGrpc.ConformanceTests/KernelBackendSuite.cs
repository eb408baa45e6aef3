using System.Diagnostics;
using UffdGrpc.Mm;
using UffdGrpc.Scenarios;
using UffdGrpc.Scenarios.Host;
using Xunit.Abstractions;

namespace UffdGrpc.ConformanceTests;

/// <summary>
/// The host probed once per test run: <c>uffdgrpc probe --out FILE</c> in a child process (the
/// real-kernel calls never run in the test process), or why it could not run.
/// </summary>
public sealed class HostProfileFixture : IAsyncLifetime
{
    public HostProfile? Profile { get; private set; }
    public string? SkipReason { get; private set; }
    public string ProbeOutput { get; private set; } = "";

    /// <summary>Runs the CLI (built beside the tests, in the same configuration) in a child process: its exit status and its output.</summary>
    public static async Task<(int Rc, string Output)> CliAsync(params string[] args)
    {
        var config = AppContext.BaseDirectory.Contains($"{Path.DirectorySeparatorChar}Debug{Path.DirectorySeparatorChar}", StringComparison.Ordinal) ? "Debug" : "Release";
        var cli = Path.Combine(ScenarioFolders.RepoRoot, "src", "UffdGrpc.Cli", "bin", config, "net10.0", "UffdGrpc.Cli.dll");
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(cli);
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        await p.WaitForExitAsync();
        return (p.ExitCode, await stdout + await stderr);
    }

    public async Task InitializeAsync()
    {
        if (!OperatingSystem.IsLinux())
        {
            SkipReason = "not Linux";
            return;
        }
        var file = Path.Combine(Path.GetTempPath(), $"uffdgrpc-probe-{Environment.ProcessId}.json");
        var (rc, text) = await CliAsync("probe", "--out", file);
        ProbeOutput = text;
        try
        {
            if (rc == 2)
                SkipReason = ProbeOutput.Trim();
            else if (rc != 0)
                throw new InvalidOperationException($"probe failed (exit {rc}): {ProbeOutput}");
            else
                Profile = HostProfile.FromJson(await File.ReadAllTextAsync(file));
        }
        finally
        {
            File.Delete(file);
        }
    }

    public Task DisposeAsync() => Task.CompletedTask;
}

/// <summary>
/// Kernel-backed mode on this host: probe's profile against the built-in 6.18 one, and every
/// shared scenario on the model (loaded with the probed profile) and on the real kernel
/// (kuffd). Skipped, with the reason, where the host cannot run real userfaultfd.
/// </summary>
public sealed class KernelBackendSuite(HostProfileFixture host, ITestOutputHelper output) : IClassFixture<HostProfileFixture>
{
    private HostProfile Host()
    {
        Skip.If(host.SkipReason is not null, host.SkipReason);
        return host.Profile!;
    }

    [SkippableFact]
    public void Probe_profile_equals_the_built_in_6_18_profile_field_by_field()
    {
        var probed = Host();
        output.WriteLine(host.ProbeOutput);
        var builtIn = HostProfile.FromModel(KernelProfile.V6_18, Kernel.DefaultConfig(KernelProfile.V6_18));
        var diffs = probed.Compare(builtIn);
        foreach (var d in diffs)
            output.WriteLine($"{(d.Machine ? "machine setting" : "KERNEL")} {d.Field}: host {d.Host}, built-in 6.18 {d.Model}");
        output.WriteLine($"compared: uffd_api_features, pagemap_scan, {builtIn.RegisterIoctls.Count} register lines, soft_dirty, memory_failure; machine settings thp, thp_use_zero_page, read_fault_zero_page, swap");
        // The kernel's interface and built-in config must be the 6.18 profile's; machine
        // settings (THP mode, zero page on read faults, swap) are the host's and are printed.
        Assert.DoesNotContain(diffs, d => !d.Machine);
        // The profile file loads as the 6.18 profile with the host's machine settings.
        var k = probed.ToKernel(out var error);
        Assert.True(k is not null, error);
        Assert.Equal(KernelProfile.V6_18, k!.Profile);
        Assert.Empty(probed.Compare(HostProfile.FromModel(k.Profile, k.Config)));
    }

    [SkippableFact]
    public async Task Every_shared_scenario_gives_the_same_trace_on_the_model_and_on_the_real_kernel()
    {
        var probed = Host();
        var why = KuffdHarness.Unavailable();
        Skip.If(why is not null, why);
        Skip.If(ScenarioFolders.Shared is null, "shared/conformance/scenarios not found beside the repository");
        var tally = new DiffTally();
        foreach (var f in Directory.GetFiles(ScenarioFolders.Shared!, "*.scn").Order(StringComparer.Ordinal))
        {
            var r = await KernelDiff.RunAsync(Path.GetFileNameWithoutExtension(f), await File.ReadAllTextAsync(f), () => new InProcessBackend(probed.ToKernel(out _)!));
            output.WriteLine(KernelDiff.Format(r));
            tally.Add(r);
        }
        output.WriteLine(tally.Summary);
        Assert.True(tally.Diverged.Count == 0, string.Join("\n", tally.Diverged.Select(KernelDiff.Format)));
        Assert.True(tally.Equal + tally.EqualOnRerun > 0, "no scenario ran on both backends");
    }

    /// <summary>The differential test sees a machine setting the model gets wrong: the probed read-fault zero-page behaviour, inverted.</summary>
    [SkippableFact]
    public async Task A_model_with_the_zero_page_setting_inverted_diverges_from_the_kernel()
    {
        var probed = Host();
        var why = KuffdHarness.Unavailable();
        Skip.If(why is not null, why);
        const string script = "map A 1 anon private rw\nthp A off\nread A 0\npagemap A 0 1\n";
        var wrong = probed with { ReadFaultZeroPage = !probed.ReadFaultZeroPage };
        var r = await KernelDiff.RunAsync("zero-page-read", script, () => new InProcessBackend(wrong.ToKernel(out _)!));
        output.WriteLine(KernelDiff.Format(r));
        Assert.Equal(DiffOutcome.Diverged, r.Outcome);
        Assert.True(r.KernelStable);
        r = await KernelDiff.RunAsync("zero-page-read", script, () => new InProcessBackend(probed.ToKernel(out _)!));
        output.WriteLine(KernelDiff.Format(r));
        Assert.Equal(DiffOutcome.Equal, r.Outcome);
    }

    /// <summary>`replay --diff --profile-file` from the command line: exit 1 and the DIVERGE lines with a wrong profile, 0 with the probed one.</summary>
    [SkippableFact]
    public async Task Replay_diff_exits_1_on_a_divergence_and_0_when_equal()
    {
        var probed = Host();
        var why = KuffdHarness.Unavailable();
        Skip.If(why is not null, why);
        var dir = Directory.CreateTempSubdirectory("uffdgrpc-diff-").FullName;
        try
        {
            var scn = Path.Combine(dir, "read.scn");
            await File.WriteAllTextAsync(scn, "map A 2 anon private rw\nthp A off\nread A 0\nwrite A 1 0x11\npagemap A 0 2\n");
            var right = Path.Combine(dir, "host.json");
            var wrong = Path.Combine(dir, "wrong.json");
            await File.WriteAllTextAsync(right, probed.ToJson());
            await File.WriteAllTextAsync(wrong, (probed with { ReadFaultZeroPage = !probed.ReadFaultZeroPage }).ToJson());

            var (rc, text) = await HostProfileFixture.CliAsync("replay", "--diff", "--profile-file", wrong, scn);
            output.WriteLine(text);
            Assert.Equal(1, rc);
            Assert.StartsWith("DIVERGE  read at line ", text, StringComparison.Ordinal);
            Assert.Contains("\n  model:  pagemap A 0", text, StringComparison.Ordinal);

            (rc, text) = await HostProfileFixture.CliAsync("replay", "--diff", "--profile-file", right, dir);
            output.WriteLine(text);
            Assert.Equal(0, rc);
            Assert.Equal("EQUAL    read\n", text);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
