using Microsoft.Extensions.Options;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Security;

namespace UffdGrpc.Server.Configuration;

/// <summary>
/// The start-time checks of every options section. Each failure names the configuration key
/// and the value it holds (<c>Limits:MachinesPerPrincipal = '0': …</c>), so an operator sees
/// what to fix; the server then exits with status 2 (<see cref="StartupFailure"/>).
/// </summary>
internal sealed class OptionsValidators :
    IValidateOptions<LimitOptions>,
    IValidateOptions<AuthOptions>,
    IValidateOptions<ServerOptions>,
    IValidateOptions<MetricsOptions>,
    IValidateOptions<PersistenceOptions>,
    IValidateOptions<WatchdogOptions>
{
    private static string Bad(string section, string key, object? value, string rule) =>
        $"{section}:{key} = '{value}': {rule}";

    public ValidateOptionsResult Validate(string? name, LimitOptions o)
    {
        var errors = new List<string>();
        void Positive(string key, long v)
        {
            if (v <= 0)
                errors.Add(Bad(LimitOptions.Section, key, v, "must be a positive integer"));
        }
        Positive(nameof(o.MachinesPerPrincipal), o.MachinesPerPrincipal);
        Positive(nameof(o.StreamsPerPrincipal), o.StreamsPerPrincipal);
        Positive(nameof(o.MmsPerMachine), o.MmsPerMachine);
        Positive(nameof(o.ThreadsPerMachine), o.ThreadsPerMachine);
        Positive(nameof(o.UffdsPerMachine), o.UffdsPerMachine);
        Positive(nameof(o.FilesPerMachine), o.FilesPerMachine);
        Positive(nameof(o.CompletionLogPerMachine), o.CompletionLogPerMachine);
        Positive(nameof(o.JournalEntriesPerMachine), o.JournalEntriesPerMachine);
        Positive(nameof(o.JournalBytesPerMachine), o.JournalBytesPerMachine);
        Positive(nameof(o.WorkloadsPerMachine), o.WorkloadsPerMachine);
        Positive(nameof(o.RetiredIdsPerMachine), o.RetiredIdsPerMachine);
        Positive(nameof(o.ThreadsPerWorkload), o.ThreadsPerWorkload);
        Positive(nameof(o.WorkloadWritesRecorded), o.WorkloadWritesRecorded);
        Positive(nameof(o.KernelHelpersPerServer), o.KernelHelpersPerServer);
        Positive(nameof(o.KernelMmBytes), o.KernelMmBytes);
        if (o.ServerMemoryBytes < 1 << 20)
            errors.Add(Bad(LimitOptions.Section, nameof(o.ServerMemoryBytes), o.ServerMemoryBytes, "must be at least 1 MiB (1048576)"));
        if (o.MaxMachineMemoryBytes < 1 << 20)
            errors.Add(Bad(LimitOptions.Section, nameof(o.MaxMachineMemoryBytes), o.MaxMachineMemoryBytes, "must be at least 1 MiB (1048576)"));
        return Result(errors);
    }

    public ValidateOptionsResult Validate(string? name, AuthOptions o)
    {
        var errors = new List<string>();
        if (!Enum.IsDefined(o.Anonymous))
            errors.Add(Bad(AuthOptions.Section, nameof(o.Anonymous), o.Anonymous, "must be Loopback, Allow or Deny"));
        foreach (var (principal, token) in o.Tokens)
        {
            // The token itself is a secret: name its principal and its length, never its value.
            if (principal.Length == 0)
                errors.Add($"{AuthOptions.Section}:Tokens has a token without a principal name");
            else if (token.Length < 16)
                errors.Add($"{AuthOptions.Section}:Tokens:{principal} = <{token.Length} characters>: a token must have at least 16 characters");
        }
        foreach (var shared in o.Tokens.GroupBy(t => t.Value, StringComparer.Ordinal).Where(g => g.Count() > 1))
            errors.Add($"{AuthOptions.Section}:Tokens: principals {string.Join(", ", shared.Select(t => t.Key).Order(StringComparer.Ordinal))} share a token");
        return Result(errors);
    }

    public ValidateOptionsResult Validate(string? name, ServerOptions o) =>
        ServerOptions.ParseProfile(o.DefaultProfile) is null
            ? ValidateOptionsResult.Fail(Bad(ServerOptions.Section, nameof(o.DefaultProfile), o.DefaultProfile, "must be 6.18, 6.1 or v5.7"))
            : ValidateOptionsResult.Success;

    public ValidateOptionsResult Validate(string? name, MetricsOptions o)
    {
        var errors = new List<string>();
        if (!o.PrometheusPath.StartsWith('/'))
            errors.Add(Bad(MetricsOptions.Section, nameof(o.PrometheusPath), o.PrometheusPath, "must start with '/'"));
        if (o.ListenUrl is { Length: > 0 } listen && !ListenAddresses.IsHttpUrl(listen))
            errors.Add(Bad(MetricsOptions.Section, nameof(o.ListenUrl), listen, "must be an http:// URL with a port, such as http://0.0.0.0:9464"));
        if (o.OtlpEndpoint is { Length: > 0 } otlp && !(Uri.TryCreate(otlp, UriKind.Absolute, out var u) && (u.Scheme == Uri.UriSchemeHttp || u.Scheme == Uri.UriSchemeHttps)))
            errors.Add(Bad(MetricsOptions.Section, nameof(o.OtlpEndpoint), otlp, "must be an absolute http:// or https:// URL, such as http://collector:4317"));
        if (o.OtlpExportIntervalMs < 100)
            errors.Add(Bad(MetricsOptions.Section, nameof(o.OtlpExportIntervalMs), o.OtlpExportIntervalMs, "must be at least 100"));
        return Result(errors);
    }

    public ValidateOptionsResult Validate(string? name, PersistenceOptions o) =>
        o.Directory is { Length: > 0 } d && d.IndexOfAny(Path.GetInvalidPathChars()) >= 0
            ? ValidateOptionsResult.Fail(Bad(PersistenceOptions.Section, nameof(o.Directory), d, "is not a valid path"))
            : ValidateOptionsResult.Success;

    public ValidateOptionsResult Validate(string? name, WatchdogOptions o) =>
        o.UserfaultSeconds >= 0 && double.IsFinite(o.UserfaultSeconds)
            ? ValidateOptionsResult.Success
            : ValidateOptionsResult.Fail(Bad(WatchdogOptions.Section, nameof(o.UserfaultSeconds), o.UserfaultSeconds, "must be 0 (off) or a positive number of seconds"));

    private static ValidateOptionsResult Result(List<string> errors) =>
        errors.Count == 0 ? ValidateOptionsResult.Success : ValidateOptionsResult.Fail(errors);
}
