'use strict'
// Recipes for @camunda8/sdk (tested with 8.8.13): use the credential tasklist-operator keeps
// in its derived Secret, mounted as a volume, and follow it when the operator replaces it.
//
// No strategy of the SDK reads a file that changes: BEARER takes CAMUNDA_OAUTH_TOKEN once
// (its provider has setToken(), which nothing calls), BASIC takes a username and password,
// and COOKIE logs in by itself. These providers read the mounted files instead, again
// whenever the kubelet has swapped the volume's contents, and once more after a 401
// (retryOn401). See docs/clients.md.
const fs = require('node:fs')
const path = require('node:path')
const { Auth } = require('@camunda8/sdk')

// The kubelet writes a Secret volume as timestamped folders and swaps the symlink `..data`
// to the new one atomically; every key file is a symlink through `..data`. So `..data`'s
// target names the contents, and a changed target means new contents. (A folder that is
// not a kubelet volume falls back to the file's modification time.)
function contentsVersion(dir, key) {
  try {
    return fs.readlinkSync(path.join(dir, '..data'))
  } catch {
    return String(fs.statSync(path.join(dir, key)).mtimeMs)
  }
}

function readKey(dir, key) {
  return fs.readFileSync(path.join(dir, key), 'utf8').trim()
}

function readKeyIfPresent(dir, key) {
  return fs.existsSync(path.join(dir, key)) ? readKey(dir, key) : undefined
}

// oauth2: the BEARER strategy's own provider, handed the mounted `token` whenever it changed.
class MountedBearerProvider extends Auth.BearerAuthProvider {
  constructor(dir) {
    const version = contentsVersion(dir, 'token')
    super({ config: { CAMUNDA_OAUTH_TOKEN: readKey(dir, 'token') } })
    this.dir = dir
    this.version = version
  }

  async getHeaders(audience) {
    if (contentsVersion(this.dir, 'token') !== this.version) await this.reload()
    return super.getHeaders(audience)
  }

  async reload() {
    // The version first: a swap in between only makes the next call read again.
    this.version = contentsVersion(this.dir, 'token')
    await this.setToken(readKey(this.dir, 'token'))
  }
}

// Any auth method: the headers the Secret holds, as they are. `authorization` for oauth2
// (`Bearer …`) and basic (`Basic …`); for a cookie login `cookie`, plus `csrfToken` as the
// X-CSRF-TOKEN header, which Tasklist wants on POST (every search is a POST).
class MountedSecretHeaders {
  constructor(dir) {
    this.dir = dir
    this.reload()
  }

  async getHeaders() {
    if (contentsVersion(this.dir, this.key) !== this.version) this.reload()
    return this.headers
  }

  reload() {
    this.key = fs.existsSync(path.join(this.dir, 'authorization')) ? 'authorization' : 'cookie'
    this.version = contentsVersion(this.dir, this.key)
    const authorization = readKeyIfPresent(this.dir, 'authorization')
    if (authorization) {
      this.headers = { authorization }
    } else {
      const csrfToken = readKeyIfPresent(this.dir, 'csrfToken')
      this.headers = { cookie: readKey(this.dir, 'cookie'), ...(csrfToken && { 'X-CSRF-TOKEN': csrfToken }) }
    }
  }
}

// The kubelet updates a mounted Secret up to a minute or more after the operator wrote it,
// so a token can expire in the file: on a 401, read the file again and retry once. (The
// SDK's own retries cover 429 and 503 only.)
async function retryOn401(provider, call) {
  try {
    return await call()
  } catch (error) {
    if (error?.response?.statusCode !== 401) throw error
    await provider.reload()
    return call()
  }
}

module.exports = { MountedBearerProvider, MountedSecretHeaders, retryOn401 }

// Usage, in a Pod that mounts the Secret at /var/run/tasklist:
//
//   const { Camunda8 } = require('@camunda8/sdk')
//   const tasklistAuth = new MountedBearerProvider('/var/run/tasklist')
//   const c8 = new Camunda8({ CAMUNDA_AUTH_STRATEGY: 'BEARER', oAuthProvider: tasklistAuth,
//     CAMUNDA_TASKLIST_BASE_URL: process.env.TASKLIST_URL })
//   const tasklist = c8.getTasklistApiClient()
//   const tasks = await retryOn401(tasklistAuth, () => tasklist.searchTasks({ pageSize: 10 }))
