using System.CommandLine;
using UffdGrpc.Cli.Probe;
using UffdGrpc.Mm;
using UffdGrpc.Scenarios.Host;

namespace UffdGrpc.Cli;

/// <summary>
/// <c>probe</c>: measures the host's userfaultfd interface and memory knobs
/// (<see cref="HostProbe"/>), writes them as a profile file the model loads
/// (<c>replay --profile-file</c>), and compares them field by field with a built-in profile.
/// </summary>
internal static class ProbeCommand
{
    public static Command Build()
    {
        var output = new Option<string?>("--out") { Description = "Write the profile (JSON) to this file" };
        var compare = new Option<string>("--compare") { Description = "The built-in profile to compare with: 6.18 (default), 6.1 or 5.7", DefaultValueFactory = _ => "6.18" };
        var cmd = new Command("probe", "Report the host kernel's userfaultfd features, UFFDIO_REGISTER ioctls per mode on anon/shmem/hugetlb and the knobs (THP, zero page, soft-dirty, memory-failure, swap); write them as a profile file and compare with a built-in profile.") { output, compare };
        cmd.SetAction(async (parse, ct) =>
        {
            var prof = CliCommands.ParseProfile(parse.GetValue(compare));
            if (prof is null)
            {
                await Console.Error.WriteLineAsync("probe: unknown profile (use 6.18, 6.1 or 5.7)").ConfigureAwait(false);
                return 1;
            }
            if (HostProbe.Unavailable() is { } why)
            {
                await Console.Error.WriteLineAsync("probe: cannot probe this host: " + why).ConfigureAwait(false);
                return 2;
            }
            var host = HostProbe.Run();
            var json = host.ToJson();
            if (parse.GetValue(output) is { } path)
                await File.WriteAllTextAsync(path, json, ct).ConfigureAwait(false);
            else
                await Console.Out.WriteAsync(json).ConfigureAwait(false);
            await Console.Out.WriteAsync(Report(host, prof.Value)).ConfigureAwait(false);
            return 0;
        });
        return cmd;
    }

    /// <summary>The comparison with the built-in profile (its default machine settings) as probe prints it.</summary>
    public static string Report(HostProfile host, KernelProfile profile)
    {
        var model = HostProfile.FromModel(profile, Kernel.DefaultConfig(profile));
        var diffs = host.Compare(model);
        var sb = new System.Text.StringBuilder();
        var name = HostProfile.ProfileName(profile);
        sb.Append($"{host.Source} compared with the built-in {name} profile: {diffs.Count(d => !d.Machine)} kernel difference(s), {diffs.Count(d => d.Machine)} machine-setting difference(s)\n");
        foreach (var d in diffs)
            sb.Append($"  {(d.Machine ? "machine" : "kernel ")} {d.Field}: host {d.Host}, {name} {d.Model}\n");
        var notModelled = host.NotModelled.ToList();
        if (notModelled.Count > 0)
            sb.Append($"  not modelled (hugetlb; reported only): {string.Join(", ", notModelled.Select(k => $"{k} {host.RegisterIoctls[k]}"))}\n");
        return sb.ToString();
    }
}
