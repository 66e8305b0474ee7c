<#
.SYNOPSIS
    Bring one PC's part of the EV charging network up or down with Docker Compose (Windows).

.DESCRIPTION
    The PowerShell twin of scripts/deploy.sh.

      scripts\deploy.ps1 -Pc pc2 up                  write .env, build, start, wait until healthy
      scripts\deploy.ps1 -Pc pc2 down                stop and remove the containers (data kept)
      scripts\deploy.ps1 -Pc pc2 status              containers and their health
      scripts\deploy.ps1 -Pc pc3 logs [-Service S]   follow the logs
      scripts\deploy.ps1 -Pc pc3 attach -Service engine-cp1   an engine's menu (Ctrl-P Ctrl-Q detaches)
      scripts\deploy.ps1 -Pc pc2 config              the compose file with .env applied
      scripts\deploy.ps1 -Pc pc2 keys                what up does first: make (pc2, all) or check
                                                    (pc1, pc3) the certificates and secrets
      scripts\deploy.ps1 -Pc pc2 up -Build           build the images on a freshly pulled base first
      scripts\deploy.ps1 -Pc pc2 up -Follow          once healthy, follow the logs (Ctrl-C stops following)

    pc1: Kafka node 1, the standby Central, driver dashboard; pc2: Kafka node 2, Kafka UI, the
    active Central; pc3: Kafka node 3, charging points, site dashboard; all: everything on
    this one host (one broker, one Central). Addresses and ports come from network_config.py,
    overridden by environment variables ($env:PC2_IP = "192.168.1.20").

    Secure by default: up on pc2 (or all) makes the local CA, the certificates, the Kafka
    passwords and the audit key the two Centrals share when they are missing (certs\,
    secrets\), and names the files to copy to PC1 and PC3 before their up (docs/security.md,
    "The deployment"; SECURE=0 turns TLS and Kafka's logins off).

.PARAMETER Pc
    pc1, pc2, pc3 or all: which PC's compose file (all: docker-compose.yml).

.PARAMETER Action
    up, down, status, logs, attach, config or keys (status when omitted).

.PARAMETER Service
    The service for logs and attach (e.g. engine-cp1), and for up -Follow; all when omitted.

.PARAMETER WaitSeconds
    How long up waits for every container to be healthy (180; EV_DEPLOY_WAIT in deploy.sh).

.PARAMETER Build
    With up: build the images first, on a freshly pulled base image (docker compose build
    --pull), then start. deploy.sh: --build.

.PARAMETER Follow
    With up: once healthy, follow the logs (of -Service, or all) until Ctrl-C; the containers
    keep running. logs always follows, with or without it. deploy.sh: --follow.
#>
[CmdletBinding()]
param(
    [Parameter(Position = 0)]
    [ValidateSet("up", "down", "status", "logs", "attach", "config", "keys")]
    [string]$Action = "status",

    [Parameter(Mandatory = $true)]
    [ValidateSet("pc1", "pc2", "pc3", "all")]
    [string]$Pc,

    [string]$Service = "",

    [int]$WaitSeconds = 180,

    [switch]$Build,

    [switch]$Follow
)

$ErrorActionPreference = "Stop"
Set-Location (Split-Path -Parent $PSScriptRoot)

function Fail([string]$Message) {
    Write-Host "deploy: $Message" -ForegroundColor Red
    exit 1
}

function Exit-Usage([string]$Message) {
    Write-Host "deploy: $Message (Get-Help scripts\deploy.ps1 -Detailed)" -ForegroundColor Red
    exit 2
}

if ($Build -and $Action -ne "up") { Exit-Usage "-Build goes with up" }
if ($Follow -and $Action -notin @("up", "logs")) { Exit-Usage "-Follow goes with up (logs always follows)" }

$File = if ($Pc -eq "all") { "docker-compose.yml" } else { "docker-compose.$Pc.yml" }
$Project = "ev-$Pc"

# docker compose (v2 plugin, Docker Desktop) or the older docker-compose.
$ComposeCmd = $null
& docker compose version *> $null
if ($LASTEXITCODE -eq 0) { $ComposeCmd = @("docker", "compose") }
elseif (Get-Command docker-compose -ErrorAction SilentlyContinue) { $ComposeCmd = @("docker-compose") }
else { Fail "neither 'docker compose' nor 'docker-compose' found: install Docker Desktop" }

function Invoke-Compose {
    $exe = $ComposeCmd[0]
    $pre = @($ComposeCmd | Select-Object -Skip 1)
    & $exe @pre --project-name $Project --env-file .env -f $File @args
    if ($LASTEXITCODE -ne 0) { Fail "'$($ComposeCmd -join ' ') $($args -join ' ')' failed (exit $LASTEXITCODE)" }
}

function Find-Python {
    foreach ($candidate in @(@("py", "-3"), @("python"), @("python3"))) {
        if (Get-Command $candidate[0] -ErrorAction SilentlyContinue) { return ,$candidate }
    }
    Fail "Python 3.11 not found (it writes .env): install it from python.org"
}

function Write-EnvFile {
    $py = Find-Python
    $pyArgs = @($py | Select-Object -Skip 1)
    # Three PCs: every PC's Kafka node is dialled at its PCn_IP, so none may be loopback.
    $checks = if ($Pc -eq "all") { @() } else { @("--three-pcs") }
    & $py[0] @pyArgs network_config.py --env .env @checks | Out-Null
    if ($LASTEXITCODE -ne 0) { Fail "network_config.py refused the settings (above)" }
    Write-Host "deploy: .env written"
}

function Invoke-Python {
    $py = Find-Python
    $pyArgs = @($py | Select-Object -Skip 1)
    & $py[0] @pyArgs @args
}

function Get-Setting([string]$Name) {
    $line = Get-Content .env | Where-Object { $_ -like "$Name=*" } | Select-Object -First 1
    return "$line" -replace "^$Name=", ""
}

# Secure by default (docs/security.md, "The deployment"): on the first up, PC2 (or all) makes
# what is missing of the local CA and the certificates (certs\), the Kafka logins' passwords
# and the audit key both Centrals share (secrets\), and says which files to copy to PC1 and
# PC3; their up checks that they have them. SECURE=0 (network_config.py) turns TLS and Kafka's
# logins off: then only the audit key is made (PC2) and copied (PC1).
function Confirm-Keys {
    $made = @()
    if ($Pc -in @("pc2", "all")) {
        if ((Get-Setting "SECURE") -eq "1") {
            if (-not (Test-Path certs/ca.crt)) { $made += "the local CA (certs\ca.crt; its key certs\ca.key stays on this PC)" }
            Invoke-Python scripts/make-certs.py --out certs | Out-Null
            if ($LASTEXITCODE -ne 0) { Fail "scripts\make-certs.py failed (above): it needs Python's cryptography package (py -3 -m pip install cryptography); with new addresses, add --force to issue new certificates" }
            $said = Invoke-Python network_config.py --kafka-passwords secrets
            if ($LASTEXITCODE -ne 0) { Fail "network_config.py could not make the Kafka passwords" }
            if ("$said" -like "created*") { $made += "Kafka passwords: $("$said".Substring(8))" }
        }
        if ($Pc -eq "pc2") {
            $said = Invoke-Python network_config.py --audit-key secrets/central.audit-key
            if ($LASTEXITCODE -ne 0) { Fail "network_config.py could not create secrets\central.audit-key" }
            if ("$said" -like "created*") { $made += "the audit key both Centrals share" }
        }
    }
    if ($Pc -eq "pc2" -and $made.Count -gt 0) {
        foreach ($line in $made) { Write-Host "deploy: made $line" -ForegroundColor Yellow }
        Write-Host "deploy: keep certs\ and secrets\ private (the CA's key never leaves this PC)" -ForegroundColor Yellow
        foreach ($other in @("pc1", "pc3")) {
            $needs = Invoke-Python network_config.py --needs $other
            Write-Host "deploy: copy to $($other.ToUpper()) (the same paths in its copy of this repository) before scripts\deploy.ps1 -Pc $other up: $($needs -join ' ')" -ForegroundColor Yellow
        }
    }
    elseif ($Pc -in @("pc1", "pc3")) {
        $missing = @(Invoke-Python network_config.py --needs $Pc | Where-Object { $_ -and -not ((Test-Path $_ -PathType Leaf) -and (Get-Item $_).Length -gt 0) })
        if ($missing.Count -gt 0) { Fail "missing $($missing -join ' '): copy them from PC2 (scripts\deploy.ps1 -Pc pc2 up makes them there; docs/security.md, ""The deployment"")" }
    }
    # Kafka UI (PC2) takes its password only in its configuration (docker-compose.pc2.yml).
    if (Test-Path secrets/kafka-kafka-ui.password) { $env:KAFKA_UI_PASSWORD = Get-Content secrets/kafka-kafka-ui.password -TotalCount 1 }
    # The keys service mounts both, also when empty (SECURE=0).
    New-Item -ItemType Directory -Force certs, secrets | Out-Null
}

# Containers of this project that are not (yet) healthy; one-shot services that exited 0 are done.
function Get-Unhealthy {
    $exe = $ComposeCmd[0]
    $pre = @($ComposeCmd | Select-Object -Skip 1)
    $ids = & $exe @pre --project-name $Project --env-file .env -f $File ps -q
    $pending = @()
    foreach ($id in $ids) {
        if (-not $id) { continue }
        $info = (& docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.State.ExitCode}}' $id) -split ' '
        if ($LASTEXITCODE -ne 0) { continue }  # removed since it was listed
        $name, $status, $health, $code = $info
        if ($status -eq "exited" -and $code -eq "0") { continue }
        if ($status -ne "running" -or ($health -ne "healthy" -and $health -ne "-")) {
            $pending += "$($name.TrimStart('/'))($status/$health)"
        }
    }
    return ,$pending
}

# down, status, logs and attach read the .env the last `up` wrote; without one, a fresh one.
if ($Action -notin @("up", "config", "keys") -and -not (Test-Path .env)) {
    $py = Find-Python
    $pyArgs = @($py | Select-Object -Skip 1)
    & $py[0] @pyArgs network_config.py --env .env | Out-Null
    if ($LASTEXITCODE -ne 0) { Fail "network_config.py refused the settings" }
}

switch ($Action) {
    "up" {
        Write-EnvFile
        Confirm-Keys
        & docker info *> $null
        if ($LASTEXITCODE -ne 0) { Fail "the Docker engine does not answer: start Docker Desktop first" }
        if ($Build) { Invoke-Compose build --pull }
        Invoke-Compose up -d --build --remove-orphans
        $deadline = (Get-Date).AddSeconds($WaitSeconds)
        while (($pending = Get-Unhealthy).Count -gt 0) {
            if ((Get-Date) -gt $deadline) {
                Invoke-Compose ps
                Fail "not healthy after $WaitSeconds s: $($pending -join ', ') (scripts\deploy.ps1 -Pc $Pc logs -Service NAME)"
            }
            Start-Sleep -Seconds 3
        }
        Invoke-Compose ps
        Write-Host "deploy: $Pc is up and healthy. Check it from every PC: python scripts\preflight.py --pc $Pc" -ForegroundColor Green
        if ($Follow) {
            Write-Host "deploy: following the logs; Ctrl-C stops following, the containers keep running"
            if ($Service) { Invoke-Compose logs -f --tail 200 $Service } else { Invoke-Compose logs -f --tail 200 }
        }
    }
    "down" { Invoke-Compose down --remove-orphans }
    "status" {
        Invoke-Compose ps
        $pending = Get-Unhealthy
        if ($pending.Count -gt 0) { Write-Host "not healthy: $($pending -join ', ')" -ForegroundColor Yellow; exit 1 }
    }
    "logs" {
        if ($Service) { Invoke-Compose logs -f --tail 200 $Service } else { Invoke-Compose logs -f --tail 200 }
    }
    "attach" {
        if (-not $Service) { Fail "attach which service? e.g. scripts\deploy.ps1 -Pc $Pc attach -Service engine-cp1" }
        $exe = $ComposeCmd[0]
        $pre = @($ComposeCmd | Select-Object -Skip 1)
        $id = & $exe @pre --project-name $Project --env-file .env -f $File ps -q $Service
        if (-not $id) { Fail "$Service is not running in $Project (scripts\deploy.ps1 -Pc $Pc status)" }
        Write-Host "deploy: attached to $Service; detach with Ctrl-P Ctrl-Q (Ctrl-C would stop it)"
        & docker attach $id
    }
    "config" {
        Write-EnvFile
        Invoke-Compose config
    }
    "keys" {
        Write-EnvFile
        Confirm-Keys
    }
}
