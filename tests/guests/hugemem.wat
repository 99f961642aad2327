;; Declares 512 MiB of initial linear memory: more than the sandbox allows, so it cannot even
;; be instantiated (limit memory).
(module
  (memory (export "memory") 8192)
  (func (export "_start")))
