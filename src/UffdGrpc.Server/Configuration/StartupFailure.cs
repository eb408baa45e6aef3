using Microsoft.Extensions.Options;

namespace UffdGrpc.Server.Configuration;

/// <summary>
/// The server's answer to a configuration it cannot start with: one line on standard error
/// naming each bad key and its value, and exit status 2 — no stack trace.
/// </summary>
internal static partial class StartupFailure
{
    /// <summary>Exit status of a server stopped by bad configuration.</summary>
    public const int ExitCode = 2;

    /// <summary>The message for <paramref name="ex"/> when it is a configuration error (bad value, unknown enum name, failed check).</summary>
    public static bool IsConfiguration(Exception ex, out string message)
    {
        var errors = new List<string>();
        Collect(ex, errors);
        message = "uffdgrpc-server: invalid configuration: " + string.Join("; ", errors.Distinct(StringComparer.Ordinal));
        return errors.Count > 0;
    }

    private static void Collect(Exception ex, List<string> errors)
    {
        switch (ex)
        {
            case AggregateException a:
                foreach (var inner in a.InnerExceptions)
                    Collect(inner, errors);
                break;
            case OptionsValidationException v:
                errors.AddRange(v.Failures);
                break;
            case InvalidConfigurationException c:
                errors.Add(c.Message);
                break;
            // ErrorOnUnknownConfiguration: "… not found on the instance of UffdGrpc.Server.Security.LimitOptions: 'Machines'".
            case InvalidOperationException i when UnknownKeys().Match(i.Message) is { Success: true } m:
                var section = m.Groups[1].Value switch
                {
                    nameof(Security.LimitOptions) => Security.LimitOptions.Section,
                    nameof(Security.AuthOptions) => Security.AuthOptions.Section,
                    nameof(ServerOptions) => ServerOptions.Section,
                    nameof(MetricsOptions) => MetricsOptions.Section,
                    nameof(Hosting.PersistenceOptions) => Hosting.PersistenceOptions.Section,
                    nameof(Hosting.WatchdogOptions) => Hosting.WatchdogOptions.Section,
                    var other => other,
                };
                errors.Add($"{section} has no key {m.Groups[2].Value.Replace("'", "", StringComparison.Ordinal)} (a typo?)");
                break;
            // The binder's own failures: "Failed to convert configuration value 'x' at 'Limits:…' to type …".
            case InvalidOperationException i when i.Message.Contains("configuration value", StringComparison.Ordinal):
                errors.Add(i.Message + (i.InnerException is { } e ? " (" + e.Message + ")" : ""));
                break;
        }
    }

    [System.Text.RegularExpressions.GeneratedRegex(@"not found on the instance of [\w.]*?(\w+): (.*)$")]
    private static partial System.Text.RegularExpressions.Regex UnknownKeys();
}
