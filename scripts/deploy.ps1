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
      scripts\deploy.ps1 -Pc pc2 up -Build           build the images on a freshly pulled base first
      scripts\deploy.ps1 -Pc pc2 up -Follow          once healthy, follow the logs (Ctrl-C stops following)

    pc1: Kafka node 1, the standby Central, driver dashboard; pc2: Kafka node 2, Kafka UI, the
    active Central; pc3: Kafka node 3, charging points, site dashboard; all: everything on
    this one host (one broker, one Central). Addresses and ports come from network_config.py,
    overridden by environment variables ($env:PC2_IP = "192.168.1.20").

    The two Centrals share an audit key, secrets\central.audit-key: up on pc2 creates it when
    missing, and it must be copied to PC1 before up on pc1.

.PARAMETER Pc
    pc1, pc2, pc3 or all: which PC's compose file (all: docker-compose.yml).

.PARAMETER Action
    up, down, status, logs, attach or config (status when omitted).

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
    [ValidateSet("up", "down", "status", "logs", "attach", "config")]
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

# The audit key both Centrals share (Central reads it beside its database; the compose files
# copy it into Central's volume): made once on PC2, copied to PC1 by the operator.
$AuditKey = "secrets/central.audit-key"
function Confirm-AuditKey {
    if ($Pc -eq "pc2") {
        $py = Find-Python
        $pyArgs = @($py | Select-Object -Skip 1)
        $said = & $py[0] @pyArgs network_config.py --audit-key $AuditKey
        if ($LASTEXITCODE -ne 0) { Fail "network_config.py could not create $AuditKey" }
        if ("$said" -like "created*") {
            Write-Host "deploy: created $AuditKey, the audit key both Centrals share. Copy it to PC1 (the same path in its copy of this repository) before scripts\deploy.ps1 -Pc pc1 up; keep it secret, like the TLS keys" -ForegroundColor Yellow
        }
    }
    elseif ($Pc -eq "pc1" -and -not (Test-Path $AuditKey -PathType Leaf)) {
        Fail "$AuditKey is missing: copy it from PC2 (scripts\deploy.ps1 -Pc pc2 up creates it there); the standby Central needs the active one's audit key"
    }
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
        $name, $status, $health, $code = $info
        if ($status -eq "exited" -and $code -eq "0") { continue }
        if ($status -ne "running" -or ($health -ne "healthy" -and $health -ne "-")) {
            $pending += "$($name.TrimStart('/'))($status/$health)"
        }
    }
    return ,$pending
}

# down, status, logs and attach read the .env the last `up` wrote; without one, a fresh one.
if ($Action -notin @("up", "config") -and -not (Test-Path .env)) {
    $py = Find-Python
    $pyArgs = @($py | Select-Object -Skip 1)
    & $py[0] @pyArgs network_config.py --env .env | Out-Null
    if ($LASTEXITCODE -ne 0) { Fail "network_config.py refused the settings" }
}

switch ($Action) {
    "up" {
        Write-EnvFile
        Confirm-AuditKey
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
}
