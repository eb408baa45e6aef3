namespace UffdGrpc.Server.Configuration;

/// <summary>
/// Where the server listens: ASP.NET Core's own keys (<c>urls</c> / <c>ASPNETCORE_URLS</c> /
/// <c>--urls</c>, <c>http_ports</c> / <c>ASPNETCORE_HTTP_PORTS</c>, <c>Kestrel:Endpoints</c>),
/// and when none is set, <see cref="UffdDefaults.Address"/> — the address every CLI command
/// and the SDK use by default. <c>Metrics:ListenUrl</c> adds an HTTP/1.1 endpoint for
/// scrapers beside the h2c gRPC endpoints.
/// </summary>
internal static class ListenAddresses
{
    /// <summary>Whether <paramref name="url"/> is an http(s) URL with a port, as Kestrel binds it (host <c>+</c> and <c>*</c> included).</summary>
    public static bool IsHttpUrl(string url)
    {
        var t = url.Trim().Replace("://+:", "://0.0.0.0:", StringComparison.Ordinal).Replace("://*:", "://0.0.0.0:", StringComparison.Ordinal);
        return Uri.TryCreate(t, UriKind.Absolute, out var u)
            && (u.Scheme == Uri.UriSchemeHttp || u.Scheme == Uri.UriSchemeHttps)
            && u.AbsolutePath == "/" && t.LastIndexOf(':') > t.IndexOf("//", StringComparison.Ordinal);
    }

    private static string[] Split(string? s) => (s ?? "").Split(';', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    /// <summary>
    /// Checks the listen keys and applies the default URL or the metrics endpoint; throws
    /// <see cref="InvalidConfigurationException"/> naming a bad key and its value.
    /// </summary>
    public static void Configure(WebApplicationBuilder builder)
    {
        var c = builder.Configuration;
        var urls = Split(c["urls"]);
        foreach (var u in urls)
        {
            if (!IsHttpUrl(u))
                throw new InvalidConfigurationException($"urls = '{c["urls"]}': '{u}' is not an http:// URL with a port, such as {UffdDefaults.Address}");
        }
        string[] ports = [.. Split(c["http_ports"]), .. Split(c["https_ports"])];
        foreach (var p in ports)
        {
            if (!ushort.TryParse(p, out _))
                throw new InvalidConfigurationException($"http_ports/https_ports = '{p}': not a port number");
        }
        var endpoints = c.GetSection("Kestrel:Endpoints").GetChildren().Any();
        var metrics = c[$"{MetricsOptions.Section}:{nameof(MetricsOptions.ListenUrl)}"];
        if (string.IsNullOrWhiteSpace(metrics))
        {
            if (urls.Length == 0 && ports.Length == 0 && !endpoints)
            {
                // Kestrel's own default, not a `urls` setting: a host that replaces the server
                // (WebApplicationFactory's TestServer) is left alone.
                var d = new Uri(UffdDefaults.Address);
                builder.WebHost.ConfigureKestrel(k => k.Listen(System.Net.IPAddress.Parse(d.Host), d.Port));
            }
            return;
        }
        if (!IsHttpUrl(metrics))
            return; // OptionsValidators reports it at start, with the other Metrics keys.
        // Two protocols need named endpoints (an h2c endpoint cannot also serve HTTP/1.1), and
        // Kestrel then ignores `urls`: restate the gRPC endpoints as named endpoints too.
        var extra = new Dictionary<string, string?>
        {
            ["Kestrel:Endpoints:Metrics:Url"] = metrics,
            ["Kestrel:Endpoints:Metrics:Protocols"] = "Http1",
        };
        if (!endpoints)
        {
            string[] grpc = urls.Length > 0 ? urls
                : ports.Length > 0 ? [.. Split(c["http_ports"]).Select(p => $"http://*:{p}"), .. Split(c["https_ports"]).Select(p => $"https://*:{p}")]
                : [UffdDefaults.Address];
            for (var i = 0; i < grpc.Length; i++)
                extra[$"Kestrel:Endpoints:Grpc{i}:Url"] = grpc[i];
            // Kestrel then warns that these override `urls`: they are the same addresses.
        }
        c.AddInMemoryCollection(extra);
    }
}

/// <summary>A configuration value the server cannot start with; the message names the key and the value.</summary>
public sealed class InvalidConfigurationException(string message) : Exception(message);
